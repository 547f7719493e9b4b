//! `cbus invoke`: one method call on every machine.

use cbus_protocol::names;
use cbus_protocol::{Op, Request};

use super::{parse_args, print_values, Object};
use crate::error::{usage, Failure};
use crate::fanout::Context;
use crate::render::Shape;

pub async fn invoke(
    ctx: &Context,
    obj: Object,
    method: &str,
    args: Option<&str>,
    sig: Option<String>,
) -> Result<(), Failure> {
    let (interface, member) = names::split_member(method).map_err(usage)?;
    let args = parse_args(args, sig.as_deref())?;
    let request = Request {
        interface,
        args,
        signature: sig,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(targets, &obj.query(Op::Call, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Results)
}
