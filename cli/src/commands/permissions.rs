//! `cbus permissions`: the NATS permissions a cbus role needs, printed as nats-server
//! configuration, so a server is configured from the same sets the code relies on
//! (`protocol::permissions`) rather than from a copy that drifts.

use cbus_protocol::permissions::Role;

use crate::args::PermissionRole;
use crate::error::{usage, Failure};

pub fn run(role: PermissionRole, nkey: Option<&str>) -> Result<(), Failure> {
    let role = match role {
        PermissionRole::Agent => Role::Agent,
        PermissionRole::Gateway => Role::Gateway,
        PermissionRole::Operator => Role::Operator,
    };
    match (role, nkey) {
        (Role::Agent, Some(nkey)) => {
            cbus_protocol::subject::validate_nkey(nkey).map_err(usage)?;
        }
        (Role::Agent, None) => return Err(usage("an agent's permissions need its nkey")),
        (_, Some(_)) => return Err(usage("only an agent's permissions take an nkey")),
        (_, None) => {}
    }
    let permissions = role
        .permissions(nkey)
        .ok_or_else(|| usage("an agent's permissions need its nkey"))?;
    println!("{}", permissions.to_config());
    Ok(())
}
