//! `cbus names`: the bus names on every machine.

use cbus_protocol::{Op, Request};

use super::{json_document, print_keyed, Object};
use crate::error::Failure;
use crate::fanout::Context;
use crate::render::{self, Shape};

pub async fn names(ctx: &Context, all: bool) -> Result<(), Failure> {
    let obj = Object::new(
        "org.freedesktop.DBus".into(),
        "/org/freedesktop/DBus".into(),
    )?;
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(targets, &obj.query(Op::ListNames, None, Request::default()))
        .await?;
    if let Some(done) = json_document(ctx, &asked) {
        return done;
    }
    print_keyed(ctx, &asked, ["HOST", "NAME", "OWNER"], |value| {
        value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(name, _)| all || !name.starts_with(':'))
            .map(|(name, owner)| (name.clone(), render::human(owner, Some("s"), Shape::Single)))
            .collect()
    })
}
