//! The Debian packages (`cbus_tests::package`, as `./dev package` builds them), from the debug
//! build `./dev test` already has (stripped; a release build would add minutes to CI, and the
//! 15 MB bound on the release agent is checked by `./dev package` itself): what each holds, and
//! all three installed with `dpkg -i` into a real systemd machine and configured the way an
//! administrator would (`/etc/default/cbus-agent`: NATS URL, nkey auth, the shipped policy;
//! `/etc/default/cbus-gateway`), their units running the packaged binaries: the agent registers
//! and answers with the policy in force, the gateway's /metrics and the CLI see it; then purged.

use std::path::Path;
use std::time::Duration;

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
const NAMES: [&str; 3] = ["cbus", "cbus-agent", "cbus-gateway"];

/// Where a package lands inside the machine (not /tmp: a tmpfs there hides the overlay's).
fn in_machine(name: &str) -> String {
    format!("/var/tmp/{name}.deb")
}

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
async fn packages_install_and_run_in_a_machine() {
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
        package::build(&package::workspace_root(), &build, &NAMES)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    check_contents(&debs);

    let mut spec = MachineSpec::new("pkg-1").with_unit("sleeper.service", SLEEPER);
    spec.copies = NAMES
        .iter()
        .map(|n| (deb(&debs, n).to_owned(), in_machine(n), 0o644))
        .collect();
    let machines = tokio::task::spawn_blocking(move || cbus_tests::Fleet::boot(&[spec]))
        .await
        .unwrap();
    let m = &machines.machines[0];
    // The machine is an overlay of this host: the packages' files must be their own.
    for name in NAMES {
        let before = m.exec(&["dpkg-query", "-W", name]);
        assert!(
            !before.status.success() && !m.root_dir().join("usr/bin").join(name).exists(),
            "{name} is installed on this host already; the test would not see the package's files"
        );
    }
    // A container image's policy-rc.d (exit 101: "no services in a docker build") would keep the
    // maintainer scripts from stopping the units; a real host has none.
    let _ = std::fs::remove_file(m.root_dir().join("usr/sbin/policy-rc.d"));
    let paths: Vec<String> = NAMES.iter().map(|n| in_machine(n)).collect();
    let mut dpkg = vec!["dpkg", "-i"];
    dpkg.extend(paths.iter().map(String::as_str));
    let install = m.exec(&dpkg);
    assert!(
        install.status.success(),
        "dpkg -i failed: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    // Enabled by the packages' postinst, not started before they are configured.
    for unit in ["cbus-agent.service", "cbus-gateway.service"] {
        assert_eq!(m.exec_stdout(&["systemctl", "is-enabled", unit]), "enabled");
        assert_eq!(m.exec_stdout(&["systemctl", "is-active", unit]), "inactive");
    }
    let man = m.exec(&["zcat", "/usr/share/man/man1/cbus-agent.1.gz"]);
    assert!(String::from_utf8_lossy(&man.stdout).contains("CBUS_NATS_NKEY_AUTH"));

    let nkey = m.nkey();
    let nats = NatsServer::start_with_config(&server_config(&nkey));
    let gateway = user(&nats, "gateway", GATEWAY_PW).await;
    fleet::close_registry(&jetstream::new(gateway), 1)
        .await
        .expect("the gateway creates the registry");
    // What an administrator does: edit the conffiles, then start the units.
    configure(
        m,
        "cbus-agent",
        &format!(
            "NATS_URL={}\nCBUS_NATS_NKEY_AUTH=true\nCBUS_POLICY=/etc/cbus/policy.toml\n",
            nats.url()
        ),
    )
    .await;
    let port = cbus_tests::free_port();
    configure(
        m,
        "cbus-gateway",
        &format!(
            "NATS_URL={}\nNATS_USER=gateway\nNATS_PASSWORD={GATEWAY_PW}\n\
             CBUS_GATEWAY_LISTEN=127.0.0.1:{port}\n",
            nats.url()
        ),
    )
    .await;

    let operator = user(&nats, "operator", OPERATOR_PW).await;
    let fleet = Fleet::new(operator, "test@packages");
    wait_registered(&fleet, &nkey).await;
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

    // The packaged gateway, as its dynamic user, follows the machine: /metrics says it is up.
    let up = format!("cbus_agent_up{{host=\"pkg-1\",nkey=\"{nkey}\"}} 1");
    let seen = cbus_tests::wait_for(Duration::from_secs(20), || async {
        tokio::task::spawn_blocking(move || cbus_tests::gateway::http_get(port, "/metrics"))
            .await
            .unwrap()
            .is_some_and(|text| text.lines().any(|l| l == up))
    })
    .await;
    assert!(seen, "the packaged gateway's /metrics never had {up}");
    // The packaged CLI, inside the machine, sees it too.
    let agents = m.exec(&[
        "env",
        &format!("NATS_URL={}", nats.url()),
        "NATS_USER=operator",
        &format!("NATS_PASSWORD={OPERATOR_PW}"),
        "cbus",
        "-s",
        "agents",
    ]);
    let listed = String::from_utf8_lossy(&agents.stdout);
    assert!(
        agents.status.success() && listed.contains("pkg-1"),
        "cbus agents: {listed}{}",
        String::from_utf8_lossy(&agents.stderr)
    );

    // Purge stops the units and removes the packages' files, conffiles too.
    let mut purge = vec!["dpkg", "--purge"];
    purge.extend(NAMES);
    let purge = m.exec(&purge);
    assert!(purge.status.success(), "{purge:?}");
    for name in NAMES {
        assert_ne!(
            m.exec_stdout(&["systemctl", "is-active", &format!("{name}.service")]),
            "active"
        );
        assert!(
            !m.root_dir().join("usr/bin").join(name).exists(),
            "/usr/bin/{name} left after purge"
        );
    }
    for path in ["etc/default/cbus-agent", "etc/default/cbus-gateway"] {
        assert!(!m.root_dir().join(path).exists(), "{path} left after purge");
    }
}

/// Appends `settings` to the package's `/etc/default` file, starts its unit and waits until the
/// unit runs the packaged binary (its main process is systemd's own fork until it execs).
async fn configure(m: &cbus_tests::Machine, name: &str, settings: &str) {
    let defaults = m.root_dir().join("etc/default").join(name);
    let shipped = std::fs::read_to_string(&defaults).unwrap();
    assert!(shipped.contains("#NATS_URL="), "{shipped}");
    std::fs::write(&defaults, format!("{shipped}\n{settings}")).unwrap();
    let unit = format!("{name}.service");
    let start = m.exec(&["systemctl", "start", &unit]);
    assert!(start.status.success(), "{start:?}");
    let binary = format!("/usr/bin/{name}");
    let runs = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let pid = m.exec_stdout(&["systemctl", "show", "-p", "MainPID", "--value", &unit]);
        m.exec_stdout(&["readlink", &format!("/proc/{pid}/exe")]) == binary
    })
    .await;
    assert!(
        runs,
        "{unit} does not run {binary}: {}",
        m.exec_stdout(&["systemctl", "status", &unit])
    );
}
