//! `--target URL`: a real endpoint through a hyper-util client, HTTPS
//! through hyper-rustls (ring, webpki roots), so no system library is needed.

use http::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneService;
use tower::ServiceExt;
use tower_llm_limits::BoxError;

use super::run::{box_response, Body, Transport};

/// A transport to `url` (its scheme and authority; a path prefix is kept
/// before `/v1/messages`), and the path to post to.
///
/// # Errors
/// A URL that is not absolute http(s).
pub fn transport(url: &str) -> Result<(Transport, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--target {url}: not a URL: {e}"))?;
    let scheme = uri
        .scheme_str()
        .filter(|s| *s == "http" || *s == "https")
        .ok_or_else(|| format!("--target {url}: needs http:// or https://"))?
        .to_string();
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--target {url}: no host"))?
        .to_string();
    let prefix = uri.path().trim_end_matches('/').to_string();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build(https);
    let svc = tower::service_fn(move |mut req: Request<Body>| {
        let client = client.clone();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let full = format!("{scheme}://{authority}{path}");
        let parsed: Result<Uri, _> = full.parse();
        async move {
            *req.uri_mut() = parsed.map_err(|e| -> BoxError { Box::new(e) })?;
            let resp = client
                .request(req)
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            Ok::<_, BoxError>(box_response(resp))
        }
    });
    Ok((
        BoxCloneService::new(svc.boxed_clone()),
        format!("{prefix}/v1/messages"),
    ))
}
