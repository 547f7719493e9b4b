//! The NATS settings every part shares (`cbus_client::connect::NatsArgs`), on real parts: the
//! CLI takes a private CA from `NATS_CA` (it used to ignore it) or from its config file, and the
//! gateway (and the agent) authenticate with an nkey seed file given as `--nkey` or `NATS_NKEY`.

use std::time::Duration;

use cbus_tests::cli::*;
use cbus_tests::gateway::http_get;
use cbus_tests::{Agent, GatewayProcess, GatewayStart, NatsServer, PrivateBus};

/// `cbus agents --json` with the given environment, once the agent is registered (or the
/// deadline passed): the last attempt's output.
fn agents_with(env: &[(&str, &str)], nkey: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = command()
            .envs(env.iter().copied())
            .args(["agents", "--json"])
            .output()
            .expect("run cbus");
        if (out.status.success() && stdout(&out).contains(nkey))
            || std::time::Instant::now() > deadline
        {
            return out;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn cli_takes_the_private_ca_from_nats_ca_and_the_config_file() {
    let bus = PrivateBus::start();
    let nats = NatsServer::start_tls("");
    let ca = nats.tls_ca();
    let ca = ca.to_str().unwrap();
    let url = nats.url();
    let agent = Agent::start(&url, bus.address(), &["--tls-ca", ca]);

    let out = agents_with(&[("NATS_URL", &url), ("NATS_CA", ca)], &agent.nkey);
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(stdout(&out).contains(&agent.nkey), "{}", both(&out));

    // The same server without the CA: the CLI cannot verify it, so the CA is what let it in.
    let out = command()
        .env("NATS_URL", &url)
        .args(["agents", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cannot connect to NATS"),
        "{}",
        both(&out)
    );

    // The config file's keys are the flags' names.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, format!("nats_url = \"{url}\"\ntls_ca = \"{ca}\"\n")).unwrap();
    let file = file.to_str().unwrap();
    let out = agents_with(&[("CBUS_CONFIG", file)], &agent.nkey);
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(stdout(&out).contains(&agent.nkey), "{}", both(&out));
}

/// Writes `key`'s seed to `dir/name`, as `nk -gen user` would.
fn seed_file(dir: &std::path::Path, name: &str, key: &nkeys::KeyPair) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", key.seed().expect("seed"))).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn gateway_and_agent_authenticate_with_nkey_seed_files() {
    let bus = PrivateBus::start();
    let gateway_key = nkeys::KeyPair::new_user();
    let agent_key = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }}, {{ nkey: {} }} ] }}",
        gateway_key.public_key(),
        agent_key.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let gateway_seed = seed_file(dir.path(), "gateway.nk", &gateway_key);
    let gateway_seed = gateway_seed.as_str();
    // The agent's id stays its host key's nkey; --nkey is only how it logs in to NATS.
    let agent_seed = seed_file(dir.path(), "agent.nk", &agent_key);
    let agent = Agent::start(&nats.url(), bus.address(), &["--nkey", &agent_seed]);
    let up = format!("nkey=\"{}\"}} 1", agent.nkey);

    // The server admits only these two nkeys: only a gateway that read its seed file gets in,
    // and it sees the agent only if that one read its seed file too.
    let by_flag = GatewayProcess::start(&nats.url(), "client-token", &["--nkey", gateway_seed]);
    let by_env = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: Some("client-token"),
        env: &[("NATS_NKEY", gateway_seed)],
        ..Default::default()
    });
    for gw in [&by_flag, &by_env] {
        let seen = (0..80).any(|_| {
            let m = http_get(gw.port, "/metrics").unwrap_or_default();
            m.lines()
                .any(|l| l.starts_with("cbus_agent_up{") && l.ends_with(&up))
                || {
                    std::thread::sleep(Duration::from_millis(250));
                    false
                }
        });
        assert!(seen, "gateway on {} never saw the agent up", gw.port);
    }
}
