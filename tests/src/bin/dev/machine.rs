//! What a dev fleet machine runs: cbus-agent as a systemd unit with the NixOS module's
//! sandboxing, and demo units to point the CLI at.

use std::path::Path;

use cbus_tests::MachineSpec;

use crate::settings::{Settings, HUB_DOMAIN};

/// The agent's unit and example policy, as shipped in agent/.
const AGENT_UNIT: &str = include_str!("../../../../agent/cbus-agent.service");
const POLICY: &str = include_str!("../../../../agent/policy.example.toml");

/// The spec of machine `name` (number `index`, demo web server on `web_port`) with its host key,
/// its agent dialling `urls`; a machine at a site (`site` > 0) reaches the registry in the hub's
/// JetStream domain.
pub fn spec(
    s: &Settings,
    name: &str,
    index: u32,
    web_port: u16,
    host_key: &Path,
    urls: &[String],
    site: u32,
) -> MachineSpec {
    let p = &s.prefix;
    // Labels to target with `cbus --labels`: odd machines are web, even ones workers.
    let role = if index % 2 == 1 { "web" } else { "worker" };
    let unit = |file: &str, text: String| (format!("/etc/systemd/system/{file}"), text, 0o644);
    let mut spec = MachineSpec::new(name);
    // Only the agent's unit counts as the machine's own: it failing at boot fails `up`.
    spec.units = vec![("cbus-agent.service".into(), AGENT_UNIT.into())];
    spec.enable = vec![
        "cbus-agent.service".into(),
        format!("{p}-demo-web.service"),
        format!("{p}-demo-worker.service"),
    ];
    spec.copies = vec![
        (
            s.bin.join("cbus-agent"),
            "/usr/local/bin/cbus-agent".into(),
            0o755,
        ),
        (s.bin.join("cbus"), "/usr/local/bin/cbus".into(), 0o755),
    ];
    spec.host_key = Some(host_key.to_owned());
    spec.files = vec![
        (
            "/etc/default/cbus-agent".into(),
            format!(
                "NATS_URL={}\nCBUS_NATS_NKEY_AUTH=true\nCBUS_HOST_KEY=/etc/ssh/ssh_host_ed25519_key\n\
                 CBUS_POLICY=/etc/cbus/policy.toml\nRUST_LOG=info\nNO_COLOR=1\n{}",
                urls.join(","),
                if site > 0 {
                    format!("CBUS_JS_DOMAIN={HUB_DOMAIN}\n")
                } else {
                    String::new()
                }
            ),
            0o644,
        ),
        ("/etc/cbus/policy.toml".into(), POLICY.into(), 0o644),
        // The sandboxing of the NixOS module (nix/modules/agent.nix), so the dev fleet tries it.
        unit(
            "cbus-agent.service.d/dev.conf",
            format!(
                "[Service]\nExecStart=\nExecStart=/usr/local/bin/cbus-agent --label env=dev --label role={role}\n\
                 NoNewPrivileges=yes\nProtectSystem=full\nProtectHome=yes\nPrivateTmp=yes\n"
            ),
        ),
        // Demo units: a web server (own port: machines share the host's loopback), a worker, a
        // timer.
        unit(
            &format!("{p}-demo-web.service"),
            format!(
                "[Unit]\nDescription=cbus demo web server on 127.0.0.1:{web_port}\n[Service]\n\
                 ExecStart=/usr/bin/python3 -m http.server {web_port} --bind 127.0.0.1 --directory /usr/share/doc\n\
                 # A transient start failure (seen once on a loaded host) must not leave the machine degraded.\n\
                 Restart=on-failure\nRestartSec=1\n[Install]\nWantedBy=multi-user.target\n"
            ),
        ),
        unit(
            &format!("{p}-demo-worker.service"),
            "[Unit]\nDescription=cbus demo worker\n[Service]\nExecStart=/bin/sleep infinity\n\
             Restart=on-failure\n[Install]\nWantedBy=multi-user.target\n"
                .into(),
        ),
        unit(
            &format!("{p}-demo-tick.service"),
            "[Unit]\nDescription=cbus demo tick\n[Service]\nType=oneshot\nExecStart=/bin/true\n".into(),
        ),
        unit(
            &format!("{p}-demo-tick.timer"),
            "[Unit]\nDescription=cbus demo tick every minute\n[Timer]\nOnCalendar=minutely\n\
             [Install]\nWantedBy=timers.target\n"
                .into(),
        ),
    ];
    spec.links = vec![(
        format!("/etc/systemd/system/timers.target.wants/{p}-demo-tick.timer"),
        format!("/etc/systemd/system/{p}-demo-tick.timer"),
    )];
    spec
}
