//! The browser dashboard: static files compiled into the binary (`gateway/web/`), so the gateway
//! is one file to deploy and the page works offline (no CDN, no build step: plain ES modules).
//! Every agent-provided string is rendered with `textContent`; the Content-Security-Policy
//! forbids inline scripts and foreign sources as a second line of defence.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../web/index.html");
const STYLE: &str = include_str!("../web/style.css");

/// The page's ES modules, by path: `app.js` is the entry, the others one view or helper each.
const MODULES: [(&str, &str); 11] = [
    ("/app.js", include_str!("../web/app.js")),
    ("/dom.js", include_str!("../web/dom.js")),
    ("/ctx.js", include_str!("../web/ctx.js")),
    ("/gateway.js", include_str!("../web/gateway.js")),
    ("/bulk.js", include_str!("../web/bulk.js")),
    ("/fleet.js", include_str!("../web/fleet.js")),
    ("/units.js", include_str!("../web/units.js")),
    ("/machines.js", include_str!("../web/machines.js")),
    ("/signals.js", include_str!("../web/signals.js")),
    ("/objects.js", include_str!("../web/objects.js")),
    ("/audit.js", include_str!("../web/audit.js")),
];

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Routes of the dashboard, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route(
            "/",
            get(|| async { file(INDEX, "text/html; charset=utf-8") }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/style.css",
            get(|| async { file(STYLE, "text/css; charset=utf-8") }),
        );
    for (path, body) in MODULES {
        router = router.route(
            path,
            get(move || async move { file(body, "text/javascript; charset=utf-8") }),
        );
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_inner_html_and_no_remote_sources() {
        for text in [INDEX, STYLE].into_iter().chain(MODULES.map(|(_, m)| m)) {
            assert!(!text.contains("innerHTML"), "render with textContent");
            assert!(!text.contains("outerHTML"));
            assert!(!text.contains("insertAdjacentHTML"));
            assert!(!text.contains("document.write"));
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no remote sources"
            );
        }
        assert!(INDEX.contains("<script type=\"module\" src=\"/app.js\">"));
        // Every module imported is served.
        for (_, text) in MODULES {
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let from = line.rsplit("from '.").next().unwrap_or("");
                let path = from.trim_end_matches("';");
                assert!(
                    MODULES.iter().any(|(p, _)| *p == path),
                    "{path} imported but not served"
                );
            }
        }
    }
}
