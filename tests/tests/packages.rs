//! The Debian packages (`cbus_tests::package`, as `./dev package` builds them), from the debug
//! build `./dev test` already has (stripped; a release build would add minutes to CI, and the
//! 15 MB bound on the release agent is checked by `./dev package` itself): what each holds, and
//! the agent's package installed with `dpkg -i` into a real systemd machine, configured the way
//! an administrator would (`/etc/default/cbus-agent`: NATS URL, nkey auth, the shipped policy),
//! started as its unit, registering and answering with the policy in force, then purged.

use std::path::Path;

use async_nats::jetstream;
use cbus_client::fleet::{self, Fleet};
use cbus_protocol::{permissions, Op};
use cbus_tests::ask::*;
use cbus_tests::package::{self, Build, Deb, Entry};
use cbus_tests::{bin_path, MachineSpec, NatsServer};
use serde_json::json;

const SLEEPER: &str =
    "[Unit]\nDescription=cbus test sleeper\n[Service]\nExecStart=/bin/sleep infinity\n";
const OPERATOR_PW: &str = "op-secret";
const GATEWAY_PW: &str = "gw-secret";
/// Where the package lands inside the machine (not /tmp: a tmpfs there hides the overlay's).
const DEB_IN_MACHINE: &str = "/var/tmp/cbus-agent.deb";

fn entry<'a>(files: &'a [Entry], path: &str) -> &'a Entry {
    files
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} not in package: {files:#?}"))
}

fn deb<'a>(debs: &'a [Deb], name: &str) -> &'a Path {
    &debs.iter().find(|d| d.name == name).expect(name).path
}

/// Every file of `paths` is in `files`, none empty.
fn holds_all(files: &[Entry], paths: &[String]) {
    for path in paths {
        let e = entry(files, path);
        assert!(e.size > 0 || e.mode.starts_with('d'), "{path} is empty");
    }
}

/// A service's package: its binary, unit, `/etc/default` file and man page (and `more`), with
/// the unit enabled by its postinst and exactly `conffiles` kept across upgrades.
fn check_service(debs: &[Deb], name: &str, more: &[&str], conffiles: &[&str]) -> Vec<Entry> {
    let files = package::contents(deb(debs, name)).unwrap();
    let mut paths = vec![
        format!("./usr/bin/{name}"),
        format!("./usr/lib/systemd/system/{name}.service"),
        format!("./etc/default/{name}"),
        format!("./usr/share/man/man1/{name}.1.gz"),
    ];
    paths.extend(more.iter().map(|p| p.to_string()));
    holds_all(&files, &paths);
    let listed = package::control_file(deb(debs, name), "conffiles").unwrap();
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort_unstable();
    assert_eq!(listed, conffiles);
    let postinst = package::control_file(deb(debs, name), "postinst").unwrap();
    assert!(postinst.contains(&format!("deb-systemd-helper enable {name}.service")));
    files
}

/// The packages hold the binary (stripped), unit, defaults, policy, man pages and completions.
fn check_contents(debs: &[Deb]) {
    let agent = check_service(
        debs,
        "cbus-agent",
        &["./etc/cbus/policy.toml"],
        &["/etc/cbus/policy.toml", "/etc/default/cbus-agent"],
    );
    let bin = entry(&agent, "./usr/bin/cbus-agent");
    assert_eq!(bin.mode, "-rwxr-xr-x");
    let unstripped = std::fs::metadata(bin_path("cbus-agent")).unwrap().len();
    assert!(
        bin.size < unstripped / 2,
        "packaged agent {} bytes, built {unstripped}: not stripped",
        bin.size
    );
    check_service(debs, "cbus-gateway", &[], &["/etc/default/cbus-gateway"]);
    let cli = package::contents(deb(debs, "cbus")).unwrap();
    let paths = [
        "./usr/bin/cbus",
        "./usr/share/man/man1/cbus.1.gz",
        "./usr/share/man/man1/cbus-units.1.gz",
        "./usr/share/bash-completion/completions/cbus",
        "./usr/share/zsh/vendor-completions/_cbus",
        "./usr/share/fish/vendor_completions.d/cbus.fish",
    ];
    holds_all(&cli, &paths.map(String::from));
}

fn server_config(agent: &str) -> String {
    format!(
        "authorization {{ users = [\n\
         {{ user: operator, password: {OPERATOR_PW}, permissions: {} }}\n\
         {{ user: gateway, password: {GATEWAY_PW}, permissions: {} }}\n\
         {{ nkey: {agent}, permissions: {} }}\n] }}",
        permissions::operator().to_config(),
        permissions::gateway().to_config(),
        permissions::agent(agent).to_config()
    )
}

async fn user(nats: &NatsServer, name: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(name.into(), password.into())
        .connect(nats.url())
        .await
        .expect("user connects")
}

#[tokio::test]
async fn agent_package_installs_and_registers() {
    let out = tempfile::tempdir().unwrap();
    // The profile of this test's own binaries (`./dev test`: dev).
    let dir = bin_path("cbus-agent");
    let profile = match dir
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".to_owned(),
        Some(p) => p.to_owned(),
    };
    let build = Build {
        profile,
        out: out.path().to_owned(),
        fast: true,
    };
    let debs = tokio::task::spawn_blocking(move || {
        package::build(
            &package::workspace_root(),
            &build,
            &["cbus", "cbus-agent", "cbus-gateway"],
        )
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    check_contents(&debs);

    let mut spec = MachineSpec::new("pkg-1").with_unit("sleeper.service", SLEEPER);
    spec.copies = vec![(
        deb(&debs, "cbus-agent").to_owned(),
        DEB_IN_MACHINE.into(),
        0o644,
    )];
    let machines = tokio::task::spawn_blocking(move || cbus_tests::Fleet::boot(&[spec]))
        .await
        .unwrap();
    let m = &machines.machines[0];
    // The machine is an overlay of this host: the package's files must be its own.
    let before = m.exec(&["dpkg-query", "-W", "cbus-agent"]);
    assert!(
        !before.status.success() && !m.root_dir().join("usr/bin/cbus-agent").exists(),
        "cbus-agent is installed on this host already; the test would not see the package's files"
    );
    // A container image's policy-rc.d (exit 101: "no services in a docker build") would keep the
    // maintainer scripts from stopping the unit; a real host has none.
    let _ = std::fs::remove_file(m.root_dir().join("usr/sbin/policy-rc.d"));
    let install = m.exec(&["dpkg", "-i", DEB_IN_MACHINE]);
    assert!(
        install.status.success(),
        "dpkg -i failed: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    // Enabled by the package's postinst, not started before it is configured.
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-enabled", "cbus-agent.service"]),
        "enabled"
    );
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", "cbus-agent.service"]),
        "inactive"
    );
    let man = m.exec(&["zcat", "/usr/share/man/man1/cbus-agent.1.gz"]);
    assert!(String::from_utf8_lossy(&man.stdout).contains("CBUS_NATS_NKEY_AUTH"));

    let nkey = m.nkey();
    let nats = NatsServer::start_with_config(&server_config(&nkey));
    let gateway = user(&nats, "gateway", GATEWAY_PW).await;
    fleet::close_registry(&jetstream::new(gateway), 1)
        .await
        .expect("the gateway creates the registry");
    // What an administrator does: edit the conffile, then start the unit.
    let defaults = m.root_dir().join("etc/default/cbus-agent");
    let shipped = std::fs::read_to_string(&defaults).unwrap();
    assert!(shipped.contains("#NATS_URL="), "{shipped}");
    std::fs::write(
        &defaults,
        format!(
            "{shipped}\nNATS_URL={}\nCBUS_NATS_NKEY_AUTH=true\nCBUS_POLICY=/etc/cbus/policy.toml\n",
            nats.url()
        ),
    )
    .unwrap();
    let start = m.exec(&["systemctl", "start", "cbus-agent.service"]);
    assert!(start.status.success(), "{start:?}");

    let operator = user(&nats, "operator", OPERATOR_PW).await;
    let fleet = Fleet::new(operator, "test@packages");
    wait_registered(&fleet, &nkey).await;
    // The unit runs the packaged binary.
    let pid = m.exec_stdout(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "cbus-agent.service",
    ]);
    assert_eq!(
        m.exec_stdout(&["readlink", &format!("/proc/{pid}/exe")]),
        "/usr/bin/cbus-agent"
    );
    let sd = "org.freedesktop.systemd1";
    let root = "/org/freedesktop/systemd1";
    let r = ask(
        &fleet,
        &nkey,
        sd,
        root,
        Op::Get,
        Some("SystemState"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!("running"));
    // The shipped policy is in force (without one every call is refused): starting a service is
    // allowed, what it does not name is not.
    assert!(
        start_unit(&fleet, &nkey, m, "sleeper.service").await,
        "sleeper.service did not start through the agent"
    );
    let r = ask(
        &fleet,
        &nkey,
        sd,
        root,
        Op::Call,
        Some("ResetFailed"),
        json!({}),
    )
    .await;
    assert_eq!(err(&r).code, cbus_protocol::ErrorCode::AccessDenied);

    // Purge stops the unit and removes the package's files, conffiles too.
    let purge = m.exec(&["dpkg", "--purge", "cbus-agent"]);
    assert!(purge.status.success(), "{purge:?}");
    assert_ne!(
        m.exec_stdout(&["systemctl", "is-active", "cbus-agent.service"]),
        "active"
    );
    for path in ["usr/bin/cbus-agent", "etc/default/cbus-agent"] {
        assert!(!m.root_dir().join(path).exists(), "{path} left after purge");
    }
}
