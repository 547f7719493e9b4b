//! The `cbus` binary where no fleet is needed or none can be reached: exit codes, identities
//! from SSH keys, subjects, generated docs, config file, and argument errors caught before
//! anything is sent.

use std::time::{Duration, Instant};

use cbus_tests::cli::*;
use cbus_tests::NatsServer;

/// Nothing listens on port 1.
const NOWHERE: &str = "nats://127.0.0.1:1";

#[test]
fn unreachable_nats_is_one_line_and_exit_2_quickly() {
    for url in [NOWHERE, "nats://no-such-host.invalid:4222"] {
        let started = Instant::now();
        let out = cbus(url, &["agents"]);
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(2), "{}", both(&out));
        let err = stderr(&out);
        assert!(err.starts_with("cbus: cannot connect to NATS at "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(stdout(&out).is_empty());
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    // A server that refuses our credentials is a connection error too.
    let nats = NatsServer::start_with_config("authorization { token: \"s3cret\" }\n");
    let out = cbus(&nats.url(), &["agents"]);
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cannot connect to NATS"),
        "{}",
        both(&out)
    );
    let out = cbus(&nats.url(), &["--token", "s3cret", "agents"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "authenticated, but no agents: {}",
        both(&out)
    );
    assert!(
        stderr(&out).contains("no agents are registered"),
        "{}",
        both(&out)
    );
}

#[test]
fn argument_errors_exit_2_before_connecting() {
    // Every one of these would fail to connect (exit 2 too), so the message is what tells that
    // the arguments were refused first.
    let cases: &[(&[&str], &str)] = &[
        (&["get", "not a name", "/x", "P"], "invalid bus name"),
        (
            &["get", "org.cbus.Test", "relative/path", "P"],
            "invalid object path",
        ),
        (
            &["get", "org.cbus.Test", "/x", "1bad"],
            "invalid member name",
        ),
        (
            &["invoke", "org.cbus.Test", "/x", "Add", "[1,"],
            "ARGS_JSON is not JSON",
        ),
        (
            &["invoke", "org.cbus.Test", "/x", "Add", "{}"],
            "must be a JSON array",
        ),
        (
            &[
                "invoke",
                "org.cbus.Test",
                "/x",
                "Add",
                "[1,\"x\"]",
                "--sig",
                "ii",
            ],
            "argument 2",
        ),
        (
            &["invoke", "org.cbus.Test", "/x", "Add", "[1]", "--sig", "i("],
            "--sig",
        ),
        (
            &["set", "org.cbus.Test", "/x", "Byte", "300", "--sig", "y"],
            "VALUE",
        ),
        (
            &["invoke", "org.cbus.Test", "/x", "Echo", "[1]", "--sig", "h"],
            "file descriptors",
        ),
        (&["--timeout", "soon", "agents"], "--timeout"),
        (&["--labels", "role", "agents"], "KEY=VALUE"),
        (&["--nkeys", "Unope", "agents"], "invalid agent nkey"),
        (&["--hosts", "web-[", "agents"], "invalid selector"),
        (&["start", "a b.service"], "invalid unit name"),
        (&["status", "getty@.service"], "template"),
        (
            &["stop", "x.service", "--job-timeout", "never"],
            "--job-timeout",
        ),
        (&["monitor", "--member", "a.b"], "invalid member name"),
        (&["monitor", "--path", "x"], "invalid object path"),
        (
            &["subject", "get", "org.x", "/", "P", "--nkey", "U1"],
            "invalid agent nkey",
        ),
    ];
    for (args, expect) in cases {
        let out = cbus(NOWHERE, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", both(&out));
        let err = stderr(&out);
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        assert!(
            !err.contains("cannot connect"),
            "{args:?} connected first: {err}"
        );
    }
    // clap's own usage errors are exit 2 as well.
    for args in [
        &["get", "a.b"][..],
        &["--json", "-s", "agents"],
        &["frobnicate"],
    ] {
        assert_eq!(cbus(NOWHERE, args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn nkey_from_every_kind_of_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let expected = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let pubfile = format!("{}.pub", key.display());
    let line = std::fs::read_to_string(&pubfile).unwrap();
    // The .pub file, the line itself, stdin, and the private host key agree.
    assert_eq!(
        ok_stdout(&cbus(NOWHERE, &["nkey", &pubfile])),
        format!("{expected}\n")
    );
    assert_eq!(
        ok_stdout(&cbus(NOWHERE, &["nkey", line.trim()])),
        format!("{expected}\n")
    );
    assert_eq!(
        ok_stdout(&cbus_stdin(&["nkey"], &line)),
        format!("{expected}\n")
    );
    assert_eq!(
        ok_stdout(&cbus(NOWHERE, &["nkey", key.to_str().unwrap()])),
        format!("{expected}\n")
    );
    // A fixed key with its id computed independently (see cli/src/commands/keys.rs).
    let known =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOueD+R2hvwspWaFckuZgmPLoq30I6ZxsxUNg42wDoRt x";
    assert_eq!(
        ok_stdout(&cbus(NOWHERE, &["nkey", known])),
        "UDVZ4D7EO2DPYLFFM2CXES4ZQJR4XIVN6QR2M4NTCUGYHDNQB2CG3NAL\n"
    );
    // known_hosts-style lines keep their host.
    let out = cbus_stdin(&["nkey"], &format!("web1,10.0.0.1 {line}"));
    assert_eq!(ok_stdout(&out), format!("web1,10.0.0.1\t{expected}\n"));
    // Not ed25519, or garbage: a clear usage error.
    let out = cbus(
        NOWHERE,
        &["nkey", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ed25519"), "{}", both(&out));
    assert_eq!(cbus_stdin(&["nkey"], "").status.code(), Some(2));
}

#[test]
fn keyscan_reads_ssh_keyscan_output_and_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let expected = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let line = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    let scan = format!("# web1:22 SSH-2.0-OpenSSH_9.2\nweb1 {line}[web2]:2222 {line}");
    let out = cbus_stdin(&["keyscan", "--stdin"], &scan);
    assert_eq!(
        ok_stdout(&out),
        format!("HOST         NKEY\nweb1         {expected}\n[web2]:2222  {expected}\n")
    );
    let out = cbus_stdin(&["keyscan", "--stdin", "-s"], &scan);
    assert_eq!(
        ok_stdout(&out),
        format!("web1\t{expected}\n[web2]:2222\t{expected}\n")
    );
    let out = cbus_stdin(&["keyscan", "--stdin", "--json"], &scan);
    assert_eq!(json_of(&out)["hosts"][0]["nkey"], expected.as_str());
    let out = cbus_stdin(&["keyscan", "--stdin"], "");
    assert_eq!(out.status.code(), Some(1), "no keys: {}", both(&out));

    // Really running ssh-keyscan: a host without an SSH server is named, exit 1.
    let port_closed = std::net::TcpStream::connect("127.0.0.1:22").is_err();
    let out = cbus(NOWHERE, &["keyscan", "127.0.0.1"]);
    if port_closed {
        assert_eq!(out.status.code(), Some(1), "{}", both(&out));
        assert!(stderr(&out).contains("127.0.0.1"), "{}", both(&out));
    } else {
        assert!(stdout(&out).contains("127.0.0.1"), "{}", both(&out));
    }
}

#[test]
fn subjects_for_nats_cli() {
    let n = "UDVZ4D7EO2DPYLFFM2CXES4ZQJR4XIVN6QR2M4NTCUGYHDNQB2CG3NAL";
    let cases: &[(&[&str], String)] = &[
        (
            &["subject", "get", "org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/basic_2etarget", "ActiveState"],
            "dbus.broadcast.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.unit.basic_2etarget.get.ActiveState\n".into(),
        ),
        (
            &["subject", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "StartUnit", "--nkey", n],
            format!("dbus.agent.{n}.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.call.StartUnit\n"),
        ),
        (
            &["subject", "introspect", ":1.42", "/"],
            "dbus.broadcast._3a1_2e42.-.introspect.-\n".into(),
        ),
        (
            &["subject", "signals", "--sender", ":1.1", "--path", "/org/freedesktop/systemd1/unit"],
            "dbus.signals.*._3a1_2e1.org.freedesktop.systemd1.unit\ndbus.signals.*._3a1_2e1.org.freedesktop.systemd1.unit.>\n".into(),
        ),
        (&["subject", "signals", "--nkey", n], format!("dbus.signals.{n}.*.>\n")),
        (&["subject", "presence"], "dbus.presence.*\n".into()),
    ];
    for (args, expected) in cases {
        assert_eq!(&ok_stdout(&cbus(NOWHERE, args)), expected, "{args:?}");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_definitions() {
    let out = ok_stdout(&cbus(NOWHERE, &["completions", "bash"]));
    assert!(out.contains("_cbus()") && out.contains("keyscan"), "{out}");
    let out = ok_stdout(&cbus(NOWHERE, &["completions", "zsh"]));
    assert!(out.contains("#compdef cbus"));
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    ok_stdout(&cbus(NOWHERE, &["man", man.to_str().unwrap()]));
    for page in ["cbus.1", "cbus-invoke.1", "cbus-units.1", "cbus-subject.1"] {
        assert!(man.join(page).exists(), "{page}");
    }
    let page = std::fs::read_to_string(man.join("cbus-start.1")).unwrap();
    assert!(page.contains("no\\-block"), "{page}");
    assert!(ok_stdout(&cbus(NOWHERE, &["man"])).contains(".TH cbus"));
}

#[test]
fn config_file_gives_defaults_and_refuses_typos() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| {
        command()
            .args(args)
            .env("CBUS_CONFIG", &cfg)
            .output()
            .unwrap()
    };
    // No --server: the file's server is used (no agents there: exit 1, not a connection error).
    std::fs::write(&cfg, format!("server = \"{}\"\n", nats.url())).unwrap();
    let out = run(&["agents"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stderr(&out).contains("no agents are registered"),
        "{}",
        both(&out)
    );
    // The flag wins over the file.
    let out = run(&["--server", NOWHERE, "agents"]);
    assert_eq!(out.status.code(), Some(2));
    // XDG location when CBUS_CONFIG is unset.
    let xdg = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(xdg.path().join("cbus")).unwrap();
    std::fs::write(
        xdg.path().join("cbus/config.toml"),
        format!("server = \"{}\"\ntimeout = \"1s\"\n", nats.url()),
    )
    .unwrap();
    let out = command()
        .env_remove("CBUS_CONFIG")
        .env("XDG_CONFIG_HOME", xdg.path())
        .arg("agents")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    // A typo is refused, naming the file and the key.
    std::fs::write(&cfg, "sever = \"nats://x\"\n").unwrap();
    let out = run(&["agents"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("invalid config") && err.contains("sever"),
        "{err}"
    );
}
