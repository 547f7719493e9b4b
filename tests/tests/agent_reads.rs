//! Reads stay reads: get, getall, introspect and read-listed calls never start a D-Bus service
//! (they are sent with NO_AUTO_START), while a call the policy allows still may.

use std::time::Duration;

use cbus_client::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op};
use cbus_tests::ask::*;
use cbus_tests::{Agent, NatsServer, PrivateBus};
use serde_json::json;

const ACTIVATABLE: &str = "org.cbus.Activatable";

/// A bus with an activatable `org.cbus.Activatable` whose Exec leaves a marker file and then
/// runs the test service under that name.
#[tokio::test]
async fn reads_never_activate_services_but_allowed_calls_may() {
    let services = tempfile::tempdir().unwrap();
    let marker = services.path().join("activated");
    std::fs::write(
        services.path().join(format!("{ACTIVATABLE}.service")),
        format!(
            "[D-BUS Service]\nName={ACTIVATABLE}\nExec=/bin/sh -c 'echo started >> {}; exec {} \
             --address \"$DBUS_STARTER_ADDRESS\" --name {ACTIVATABLE} >/dev/null'\n",
            marker.display(),
            cbus_tests::bin_path("cbus-test-service").display()
        ),
    )
    .unwrap();
    let bus = PrivateBus::start_with(&format!(
        "<servicedir>{}</servicedir>",
        services.path().display()
    ));
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[allow]]\nops = [\"call\"]\ndestination = \"{ACTIVATABLE}\"\nmember = \"Add\"\n"),
    )
    .unwrap();
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--policy", policy.to_str().unwrap()],
    );
    let fleet = Fleet::new(nats.connect().await, "test@reads");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();

    let iface = json!({"interface": "org.cbus.Test1"});
    let reads = [
        (Op::Get, Some("Int32"), json!({})),
        (Op::Get, Some("Int32"), iface.clone()),
        (Op::GetAll, None, json!({})),
        (Op::GetAll, None, iface),
        (Op::Introspect, None, json!({})),
        // Read-listed: allowed without a rule, so sent as a read.
        (
            Op::Call,
            Some("Ping"),
            json!({"interface": "org.freedesktop.DBus.Peer", "signature": ""}),
        ),
        // Denied by the policy: must not start the service either (not even to look it up).
        (Op::Call, Some("Concat"), json!({"args": [["a"]]})),
    ];
    for (op, member, request) in reads {
        let r = ask(&fleet, n, ACTIVATABLE, PATH, op, member, request.clone()).await;
        let e = err(&r);
        println!("{op} {member:?} {request}: {e}");
        assert!(
            e.code == ErrorCode::NotFound
                || (member == Some("Concat") && e.code == ErrorCode::AccessDenied),
            "{op} {member:?}: {e}"
        );
        if e.code == ErrorCode::NotFound {
            // What dbus-daemon answers a NO_AUTO_START call to a name nobody owns.
            assert!(
                matches!(
                    e.dbus_name.as_deref(),
                    Some(
                        "org.freedesktop.DBus.Error.NameHasNoOwner"
                            | "org.freedesktop.DBus.Error.ServiceUnknown"
                    )
                ),
                "{e}"
            );
        }
        // Activation would have run the Exec by now (it is started before the reply).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!marker.exists(), "{op} {member:?} activated the service");
    }

    // list-names lists what runs, and does not start anything either.
    let r = ask(
        &fleet,
        n,
        "org.freedesktop.DBus",
        "/",
        Op::ListNames,
        None,
        json!({}),
    )
    .await;
    assert!(ok(&r).1.get(ACTIVATABLE).is_none());
    assert!(!marker.exists());

    // A call the policy allows may start the service, as a local call would.
    let r = ask(
        &fleet,
        n,
        ACTIVATABLE,
        PATH,
        Op::Call,
        Some("Add"),
        json!({"args": [1, 2]}),
    )
    .await;
    assert_eq!(ok(&r).1, json!([3]));
    assert!(
        marker.exists(),
        "the allowed call did not activate the service"
    );
    // Once it runs, reads work as usual.
    let r = ask(
        &fleet,
        n,
        ACTIVATABLE,
        PATH,
        Op::Get,
        Some("Int32"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!(-32));
}
