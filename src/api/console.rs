//! The admin console (SPEC §17): one static page, its script and its
//! style, compiled into the binary and served at `/admin/` on the
//! federation listener. The page signs in with a tenant admin token and
//! then speaks only the §9 admin API of the same origin, so the tenant it
//! shows is the one its Host names, like every other request.
//!
//! What it never does: load anything from another origin, put the token in
//! a URL or a cookie (it lives in the tab's `sessionStorage`), or run
//! inline script. The Content-Security-Policy below holds the browser to
//! that, whatever a future edit of the page tries.

use crate::api::Response;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Only this origin's files and API; no inline code, no framing, no
/// forms posted elsewhere, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The console's files by their path under `/admin/`; `None` for any
/// other path (a 404 like every unknown route).
pub fn asset(rest: &[&str]) -> Option<Response> {
    let (body, content_type) = match rest {
        [] | [""] | ["index.html"] => (INDEX_HTML, "text/html; charset=utf-8"),
        ["console.js"] => (CONSOLE_JS, "text/javascript; charset=utf-8"),
        ["console.css"] => (CONSOLE_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(reply(200, body.as_bytes().to_vec(), content_type))
}

/// `/admin` without its slash: the page's relative links need it.
pub fn redirect_to_slash() -> Response {
    let mut r = reply(308, Vec::new(), "text/plain; charset=utf-8");
    r.headers_mut().insert(
        http::header::LOCATION,
        http::HeaderValue::from_static("/admin/"),
    );
    r
}

fn reply(status: u16, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut r = http::Response::new(warp::hyper::body::Bytes::from(body));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    let h = r.headers_mut();
    let set = |h: &mut http::HeaderMap, name: http::header::HeaderName, value: &'static str| {
        h.insert(name, http::HeaderValue::from_static(value));
    };
    set(h, http::header::CONTENT_TYPE, content_type);
    set(h, http::header::CONTENT_SECURITY_POLICY, CSP);
    set(h, http::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, http::header::REFERRER_POLICY, "no-referrer");
    set(h, http::header::X_FRAME_OPTIONS, "DENY");
    // The files change only with the binary; an upgraded server must not
    // run yesterday's script against today's API.
    set(h, http::header::CACHE_CONTROL, "no-cache");
    warp::reply::Reply::into_response(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_small_and_self_contained() {
        let total = INDEX_HTML.len() + CONSOLE_JS.len() + CONSOLE_CSS.len();
        assert!(total <= crate::limits::CONSOLE_BYTES_MAX, "{total} bytes");
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("console.js", CONSOLE_JS),
            ("console.css", CONSOLE_CSS),
        ] {
            // No other origin: every URL in the files is relative.
            for scheme in ["http://", "https://", "//cdn", "ws://", "wss://"] {
                assert!(!text.contains(scheme), "{name} names {scheme}");
            }
        }
        // No inline script or style for the CSP to refuse.
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("style="));
        assert!(!INDEX_HTML.contains("onclick"));
        // The token is kept per tab, never where a URL or cookie would carry it.
        assert!(CONSOLE_JS.contains("sessionStorage"));
        assert!(!CONSOLE_JS.contains("localStorage"));
        assert!(!CONSOLE_JS.contains("document.cookie"));
    }

    #[test]
    fn the_peers_page_refreshes_as_often_as_the_limit_says() {
        let line = format!(
            "const PEERS_REFRESH_MS = {};",
            crate::limits::CONSOLE_PEERS_REFRESH_MS
        );
        assert!(CONSOLE_JS.contains(&line), "console.js lacks `{line}`");
    }

    #[test]
    fn assets_carry_the_policy_and_unknown_paths_are_none() {
        let r = asset(&[""]).unwrap();
        assert_eq!(r.headers()[http::header::CONTENT_SECURITY_POLICY], CSP);
        assert!(asset(&["console.js"]).is_some());
        assert!(asset(&["..", "etc"]).is_none());
        assert!(asset(&["secret"]).is_none());
        assert_eq!(redirect_to_slash().status(), 308);
    }
}
