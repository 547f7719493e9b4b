//! Proves each fixture is the real thing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cbus_tests::{Fleet, MachineSpec, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use zbus::fdo::PropertiesProxy;
use zvariant::{OwnedValue, Value};

#[tokio::test]
async fn nats_round_trip_restart_and_jetstream() {
    let mut nats = NatsServer::start();
    let client = nats.connect().await;
    let mut sub = client.subscribe("harness.test").await.unwrap();
    client.publish("harness.test", "one".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"one");

    let js = async_nats::jetstream::new(client.clone());
    let kv = cbus_client::fleet::ensure_registry(&js)
        .await
        .expect("JetStream is enabled");
    kv.put("k", "v".into()).await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));

    nats.restart();
    // The client reconnects by itself and its subscription is restored.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        client.publish("harness.test", "two".into()).await.unwrap();
        let _ = client.flush().await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            if &m.payload[..] == b"two" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "client did not reconnect after restart"
        );
    }
}

#[tokio::test]
async fn private_bus_with_test_service() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let conn = bus.connect().await;
    let props = PropertiesProxy::builder(&conn)
        .destination(TestService::NAME)
        .unwrap()
        .path(TestService::PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let iface = zbus::names::InterfaceName::try_from(TestService::IFACE).unwrap();
    let all: HashMap<String, OwnedValue> = props.get_all(iface.clone()).await.unwrap();
    let sig = |name: &str| all[name].value_signature().to_string();
    assert_eq!(sig("UInt64"), "t");
    assert_eq!(sig("Bytes"), "ay");
    assert_eq!(sig("Dict"), "a{sv}");
    assert_eq!(sig("IntDict"), "a{ui}");
    assert_eq!(sig("Struct"), "(sib)");
    assert_eq!(u64::try_from(&all["UInt64"]).unwrap(), u64::MAX);

    // Setting a writable property emits PropertiesChanged.
    let mut changes = props.receive_properties_changed().await.unwrap();
    props
        .set(iface.clone(), "Int32", Value::from(99i32))
        .await
        .unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .unwrap()
        .unwrap();
    let args = change.args().unwrap();
    assert_eq!(
        i32::try_from(args.changed_properties()["Int32"].clone()).unwrap(),
        99
    );

    // Methods, and the custom error name.
    let reply = conn
        .call_method(
            Some(TestService::NAME),
            TestService::PATH,
            Some(TestService::IFACE),
            "Add",
            &(2i32, 3i32),
        )
        .await
        .unwrap();
    assert_eq!(reply.body().deserialize::<i32>().unwrap(), 5);
    let err = conn
        .call_method(
            Some(TestService::NAME),
            TestService::PATH,
            Some(TestService::IFACE),
            "Fail",
            &("boom",),
        )
        .await
        .unwrap_err();
    match err {
        zbus::Error::MethodError(name, msg, _) => {
            assert_eq!(name.as_str(), "org.cbus.Test.Error.Failed");
            assert_eq!(msg.as_deref(), Some("boom"));
        }
        other => panic!("expected a method error, got {other:?}"),
    }

    // Signals on demand.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(TestService::IFACE)
        .unwrap()
        .member("Tick")
        .unwrap()
        .build();
    let mut ticks = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    conn.call_method(
        Some(TestService::NAME),
        TestService::PATH,
        Some(TestService::IFACE),
        "EmitSignals",
        &(3u32,),
    )
    .await
    .unwrap();
    for expected in 0..3u32 {
        let msg = tokio::time::timeout(Duration::from_secs(5), ticks.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (n, _text): (u32, String) = msg.body().deserialize().unwrap();
        assert_eq!(n, expected);
    }
}

const SLEEPER: &str =
    "[Unit]\nDescription=cbus harness sleeper\n[Service]\nExecStart=/bin/sleep infinity\n";

#[test]
fn three_real_systemd_machines() {
    let started = Instant::now();
    let specs: Vec<MachineSpec> = (1..=3)
        .map(|i| MachineSpec::new(format!("harness-{i}")).with_unit("sleeper.service", SLEEPER))
        .collect();
    let fleet = Fleet::boot(&specs);
    eprintln!("3 machines running after {:?}", started.elapsed());

    let hostnames: Vec<String> = fleet
        .machines
        .iter()
        .map(|m| m.exec_stdout(&["hostname"]))
        .collect();
    assert_eq!(hostnames, vec!["harness-1", "harness-2", "harness-3"]);
    let mut nkeys: Vec<String> = fleet.machines.iter().map(|m| m.nkey()).collect();
    nkeys.sort();
    nkeys.dedup();
    assert_eq!(nkeys.len(), 3, "each machine has its own host key");
    let host_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let mut ids: Vec<String> = fleet
        .machines
        .iter()
        .map(|m| m.exec_stdout(&["cat", "/etc/machine-id"]))
        .collect();
    assert!(
        ids.iter().all(|id| id.len() == 32 && id != host_id.trim()),
        "machine-ids {ids:?} must be their own, not the host's {host_id}"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each machine has its own machine-id");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let m = &fleet.machines[0];
        let conn = zbus::connection::Builder::address(m.bus_address().as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let manager = zbus::Proxy::new(
            &conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .await
        .unwrap();
        let state: String = manager.get_property("SystemState").await.unwrap();
        assert_eq!(state, "running");

        let active = |conn: zbus::Connection| async move {
            let unit = zbus::Proxy::new(
                &conn,
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1/unit/sleeper_2eservice",
                "org.freedesktop.systemd1.Unit",
            )
            .await
            .unwrap();
            unit.get_property::<String>("ActiveState").await.unwrap()
        };
        let _: zvariant::OwnedObjectPath = manager
            .call("StartUnit", &("sleeper.service", "replace"))
            .await
            .unwrap();
        assert!(
            cbus_tests::wait_for(Duration::from_secs(10), || {
                let c = conn.clone();
                async move { active(c).await == "active" }
            })
            .await
        );
        assert_eq!(
            m.exec_stdout(&["systemctl", "is-active", "sleeper.service"]),
            "active"
        );
        let _: zvariant::OwnedObjectPath = manager
            .call("StopUnit", &("sleeper.service", "replace"))
            .await
            .unwrap();
        assert!(
            cbus_tests::wait_for(Duration::from_secs(10), || {
                let c = conn.clone();
                async move { active(c).await == "inactive" }
            })
            .await
        );
    });

    let pids: Vec<u32> = fleet.machines.iter().map(|m| m.leader_pid()).collect();
    let state_dir = fleet.state_dir().to_path_buf();
    drop(fleet);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "machine init {pid} still running after teardown"
        );
    }
    assert_eq!(
        cbus_tests::machines::leftover_mounts(&state_dir),
        Vec::<String>::new()
    );
}
