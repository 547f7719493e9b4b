//! The browser dashboard: static files compiled into the binary (`gateway/web/`), so the gateway
//! is one file to deploy and the page works offline (no CDN, no build step: plain ES modules).
//! Every agent-provided string is rendered with `textContent`; the Content-Security-Policy
//! forbids inline scripts and foreign sources as a second line of defence.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const AUDIT_JS: &str = include_str!("../web/audit.js");
const STYLE: &str = include_str!("../web/style.css");

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
    Router::new()
        .route(
            "/",
            get(|| async { file(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/audit.js",
            get(|| async { file(AUDIT_JS, "text/javascript; charset=utf-8") }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/style.css",
            get(|| async { file(STYLE, "text/css; charset=utf-8") }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_inner_html_and_no_remote_sources() {
        for text in [INDEX, APP_JS, AUDIT_JS, STYLE] {
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
    }
}
