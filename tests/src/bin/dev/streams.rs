//! The dev fleet's history streams: the audit trail always, the signal history when
//! `CBUS_DEV_SIGNAL_HISTORY` gives its age (e.g. `1h`; `CBUS_DEV_SIGNAL_HISTORY_BYTES`, default
//! 256MiB). Created by the operator with `cbus streams init`, as a deployment would.

use std::process::Stdio;

use anyhow::Result;

use crate::settings::Settings;
use crate::{cli, warn};

/// Creates or updates the streams; a failure is a warning (the fleet runs without history).
pub fn init(s: &Settings) -> Result<()> {
    let mut cmd = cli(s)?;
    cmd.args(["streams", "init"]);
    if let Some(age) = std::env::var("CBUS_DEV_SIGNAL_HISTORY")
        .ok()
        .filter(|v| !v.is_empty())
    {
        let bytes = std::env::var("CBUS_DEV_SIGNAL_HISTORY_BYTES")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "256MiB".into());
        cmd.args([
            "--signals",
            "--signals-max-age",
            &age,
            "--signals-max-bytes",
            &bytes,
        ]);
    }
    if !cmd
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|st| st.success())
    {
        warn("cannot create the history streams (cbus streams init); no audit trail or signal history");
    }
    Ok(())
}
