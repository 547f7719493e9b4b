//! `cbus_client::fleet::Fleet::fan_out_stream` on real agents: each machine's outcome comes as
//! soon as it is known (the gateway shows per-machine results this way), a frozen machine comes
//! last, at the grace after the others' answers, and every target comes exactly once.

use std::time::{Duration, Instant};

use cbus_client::fleet::{FanOutOptions, Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{Op, Request};
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;

fn signal(agent: &Agent, sig: i32) {
    let pid = agent.pid().expect("agent running") as i32;
    // SAFETY: sending a signal to a child process we started.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[tokio::test]
async fn outcomes_stream_in_as_they_are_known() {
    let nats = NatsServer::start();
    let url = nats.url();
    let buses = [PrivateBus::start(), PrivateBus::start()];
    let _services: Vec<TestService> = buses
        .iter()
        .map(|b| TestService::start(b.address()))
        .collect();
    let agents: Vec<Agent> = buses
        .iter()
        .zip(["stream-a", "stream-b"])
        .map(|(b, host)| Agent::start(&url, b.address(), &["--allow-all", "--hostname", host]))
        .collect();
    let fleet = Fleet::new(nats.connect().await, "test");
    let mut targets = Vec::new();
    let found = cbus_tests::wait_for(Duration::from_secs(20), || {
        let fleet = fleet.clone();
        async move {
            fleet
                .registry()
                .await
                .is_ok_and(|a| a.iter().filter(|a| a.state == AgentState::Running).count() == 2)
        }
    })
    .await;
    assert!(found, "two agents never registered");
    targets.extend(fleet.registry().await.unwrap());
    targets.sort_by(|a, b| a.info.hostname.cmp(&b.info.hostname));
    assert_eq!(targets[1].info.hostname, "stream-b");

    // stream-b hangs while the registry still calls it running: it is asked and stays silent.
    agents[1].freeze();
    let query = Query {
        destination: "org.cbus.Test".into(),
        path: "/org/cbus/Test".into(),
        op: Op::Get,
        member: Some("String".into()),
        request: Request {
            interface: Some("org.cbus.Test1".into()),
            ..Default::default()
        },
    };
    let started = Instant::now();
    let mut stream = fleet
        .fan_out_stream(
            &targets,
            &query,
            Duration::from_secs(20),
            FanOutOptions::default(),
        )
        .await
        .unwrap();
    let (i, first) = stream.next().await.expect("a first outcome").unwrap();
    let first_at = started.elapsed();
    assert_eq!(i, 0);
    assert_eq!(targets[i].info.hostname, "stream-a");
    assert!(
        matches!(&first, Outcome::Replied(r) if r.result.is_ok() && r.nkey == targets[i].info.nkey),
        "{first:?}"
    );
    let (i, second) = stream.next().await.expect("a second outcome").unwrap();
    let second_at = started.elapsed();
    assert_eq!(i, 1);
    assert!(
        matches!(
            second,
            Outcome::TimedOut {
                after_grace: true,
                ..
            }
        ),
        "{second:?}"
    );
    // The answer came before the wait ended, and the wait ended at the grace, long before the
    // timeout.
    assert!(first_at < second_at, "{first_at:?} {second_at:?}");
    assert!(second_at < Duration::from_secs(10), "{second_at:?}");
    assert!(stream.next().await.is_none(), "each target exactly once");
    signal(&agents[1], libc::SIGCONT);
}
