//! Presence: hello and heartbeats in the registry, ping answers, goodbye on SIGTERM; the agent
//! reconnects by itself after a NATS restart.

mod agent_common;

use agent_common::*;
use std::time::{Duration, Instant};

use cbus_protocol::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{ErrorCode, Op, Reply, Request};
use cbus_tests::{Agent, MachineSpec, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn reconnects_after_nats_restart_and_says_goodbye() {
    let mut nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let mut agent = Agent::start(&nats.url(), bus.address(), &[]);
    let fleet = Fleet::new(nats.connect().await, "test@restart");
    wait_registered(&fleet, &agent.nkey).await;
    nats.restart();
    let n = agent.nkey.clone();
    let served = cbus_tests::wait_for(Duration::from_secs(30), || {
        let fleet = fleet.clone();
        let n = n.clone();
        async move {
            let Ok(agents) = fleet.registry().await else {
                return false;
            };
            let target: Vec<_> = agents.into_iter().filter(|a| a.info.nkey == n).collect();
            let q = Query {
                destination: NAME.into(),
                path: PATH.into(),
                op: Op::Get,
                member: Some("Int32".into()),
                request: Request::default(),
            };
            matches!(
                fleet
                    .fan_out(&target, &q, Duration::from_secs(1))
                    .await
                    .ok()
                    .and_then(|o| o.into_iter().next())
                    .map(|o| o.outcome),
                Some(Outcome::Replied(Reply { result: Ok(_), .. }))
            )
        }
    })
    .await;
    assert!(served, "agent did not serve again after the NATS restart");

    agent.stop();
    let agents = fleet.registry().await.unwrap();
    let me = agents.iter().find(|a| a.info.nkey == n).unwrap();
    assert_eq!(me.state, AgentState::Stopped);
}
