//! The operator dashboard at `/ui`: an HTML page, a script and a style sheet, embedded in the
//! binary (nothing is fetched at run time, from here or elsewhere). The page calls this API's
//! own `/v1` endpoints with the token the operator enters (kept in the tab's session storage),
//! so the assets themselves need no credential (`api::auth`), and it stays live by reading
//! `GET /v1/events` as a stream.

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::header;

/// The page.
pub const INDEX_HTML: &str = include_str!("../ui/index.html");
/// The script: views, the event stream, the token prompt, charts drawn as inline SVG.
pub const APP_JS: &str = include_str!("../ui/app.js");
/// The style sheet.
pub const APP_CSS: &str = include_str!("../ui/app.css");

/// What the page may load and call: only this origin (and a `data:` favicon, so that the
/// browser does not ask the API for one).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
}

/// One asset: served as it is, revalidated on every load so an upgraded binary's assets are
/// picked up at once.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        http::HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// Serves the dashboard's routes alone on a loopback port.
    async fn serve() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, routes::<()>()).await.unwrap();
        });
        (addr, task)
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, http::HeaderMap, String) {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = crate::api::forward_client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn assets_are_served_with_their_content_types_and_no_caching() {
        let (addr, task) = serve().await;
        for (path, content_type, body) in [
            ("/ui", "text/html; charset=utf-8", INDEX_HTML),
            ("/ui/", "text/html; charset=utf-8", INDEX_HTML),
            ("/ui/app.js", "text/javascript; charset=utf-8", APP_JS),
            ("/ui/app.css", "text/css; charset=utf-8", APP_CSS),
        ] {
            let (status, headers, got) = get(addr, path).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(got, body, "{path}");
        }
        let (_, headers, _) = get(addr, "/ui").await;
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        task.abort();
    }

    /// Every `src`/`href` value of the page (a crude scan: the page is ours and small).
    fn references(html: &str) -> Vec<&str> {
        let mut out = Vec::new();
        for attr in ["src=\"", "href=\""] {
            for (at, _) in html.match_indices(attr) {
                let rest = &html[at + attr.len()..];
                out.push(&rest[..rest.find('"').unwrap()]);
            }
        }
        out
    }

    #[test]
    fn the_page_loads_only_same_origin_assets() {
        assert!(
            !INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"),
            "index.html names an absolute URL"
        );
        let refs = references(INDEX_HTML);
        assert!(
            refs.contains(&"/ui/app.js") && refs.contains(&"/ui/app.css"),
            "{refs:?}"
        );
        for r in refs {
            assert!(
                r.starts_with("/ui/") || r.starts_with('#') || r == "data:,",
                "index.html references {r:?}, which is not one of the embedded assets"
            );
        }
        // Neither the style sheet nor the script loads anything from elsewhere: no imports,
        // no external URLs (the script's one `http://` is the SVG namespace, an identifier).
        assert!(!APP_CSS.contains("url(") && !APP_CSS.contains("@import"));
        assert!(!APP_JS.contains("https://") && !APP_JS.contains("import("));
        let http: Vec<&str> = APP_JS
            .match_indices("http://")
            .map(|(at, _)| &APP_JS[at..at + 30])
            .collect();
        assert!(
            http.iter()
                .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
            "{http:?}"
        );
    }
}
