//! `cbus names`: the bus names on every machine.

use cbus_client::fleet::Outcome;
use cbus_protocol::{Op, Request};

use super::{json_document, Object};
use crate::error::Failure;
use crate::fanout::{verdict, Context};
use crate::output;
use crate::render::{self, Shape};

pub async fn names(ctx: &Context, all: bool) -> Result<(), Failure> {
    let obj = Object::new(
        "org.freedesktop.DBus".into(),
        "/org/freedesktop/DBus".into(),
    )?;
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(
            &targets,
            &obj.query(Op::ListNames, None, Request::default()),
        )
        .await?;
    if let Some(done) = json_document(ctx, &asked) {
        return done;
    }
    let mut rows = Vec::new();
    for o in &asked.outcomes {
        let host = &o.agent.info.hostname;
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                if let Ok(s) = &r.result {
                    for (name, owner) in s.value.as_object().into_iter().flatten() {
                        if all || !name.starts_with(':') {
                            rows.push(vec![
                                host.clone(),
                                name.clone(),
                                render::human(owner, Some("s"), Shape::Single),
                            ]);
                        }
                    }
                }
            }
            other => rows.push(vec![
                host.clone(),
                "-".into(),
                render::problem(other, ctx.timeout).unwrap_or_default(),
            ]),
        }
    }
    output::print(&render::rows(ctx.format, &["HOST", "NAME", "OWNER"], &rows))?;
    verdict(&asked.outcomes, ctx.timeout)
}
