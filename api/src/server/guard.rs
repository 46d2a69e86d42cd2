//! What stands in front of every handler: the per-client rate limit, the
//! bearer token, the route's role policy, idempotency keys on POSTs, the
//! request timeout, and request metrics.

use super::AppState;
use super::access::{Begun, KeyOp};
use super::auth::{AuthError, Cached, Caller, sha256_hex};
use super::error::ApiError;
use super::keys::KeyError;
use super::model::BODY_BYTES_MAX;
use super::routes::{Access, Idempotency};
use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use engine::RequestContext;
use std::net::SocketAddr;
use std::time::Instant;

/// Header carrying the request id (set from the caller's or generated).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id kept from a caller, in characters.
pub const REQUEST_ID_CHARS_MAX: usize = 64;

/// Keeps the caller's `X-Request-Id` if it is 1 to 64 characters of
/// `[A-Za-z0-9._:-]`, else puts a generated one in its place, so what
/// reaches the logs and every event's metadata is short and harmless. The
/// response carries the id used.
pub async fn sanitize_request_id(mut request: Request, next: Next) -> Response {
    let acceptable = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .is_some_and(|value| is_acceptable_request_id(value.as_bytes()));
    if !acceptable {
        let generated = uuid::Uuid::now_v7().to_string();
        request.headers_mut().insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_str(&generated).expect("BUG: a UUID is a header value"),
        );
    }
    next.run(request).await
}

/// Whether a caller's request id may be kept.
pub fn is_acceptable_request_id(id: &[u8]) -> bool {
    (1..=REQUEST_ID_CHARS_MAX).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Header carrying an idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Header marking an answer replayed from an earlier request with the key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long a claim on an idempotency key outlives the request timeout.
pub const KEY_LOCK_MARGIN_MS: i64 = 1_000;
/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// A route's rule, as the table declares it.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The route's path pattern (a metrics label).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Its idempotency rule.
    pub idempotency: Idempotency,
    /// The read models it reads (`min_position` waits for them).
    pub reads: &'static [projections::Projection],
}

/// The guard's state: the app and the route's rule.
#[derive(Clone)]
pub struct Guarded {
    /// The app.
    pub state: AppState,
    /// The route's rule.
    pub rule: Rule,
}

/// Request bodies above this size that an answer leaves unread make hyper
/// close the connection (it discards only what it has buffered).
pub const UNREAD_BODY_CLOSE_BYTES: u64 = 16 * 1024;

/// Says `Connection: close` on an unsuccessful answer to a request whose
/// body is large or of unknown length: such answers (401, 404, 413, …) come
/// before the body is read, so the server will close the connection, and a
/// client told so opens a new one instead of sending its next request on a
/// dead one.
pub async fn close_after_unread_body(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let large = match headers.get(header::CONTENT_LENGTH) {
        Some(length) => length
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_none_or(|bytes| bytes > UNREAD_BODY_CLOSE_BYTES),
        None => headers.contains_key(header::TRANSFER_ENCODING),
    };
    let mut response = next.run(request).await;
    if large && !response.status().is_success() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The Content-Security-Policy of every answer: scripts, styles and calls
/// only from this origin, no inline script or style, no plugins, no
/// framing, no `<base>` rewriting. (`data:` images: the pages' empty icon.)
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Puts the security headers on every answer: the CSP, no MIME sniffing,
/// no framing, and no referrer (a page's address never leaks anywhere).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Runs a write to its end even if the caller hangs up. hyper drops a
/// request's future when its connection closes; a write cut between two
/// awaits (a user created and its account not yet opened, an idempotency
/// key taken and its answer not yet stored, a payout run planned and its
/// payouts not yet created) would be left half done. Writes therefore run
/// in a task of their own, which the connection cannot cancel; reads
/// (GET, HEAD, OPTIONS) are cancelled with their connection as usual. A
/// panic in the task is raised again here, for the panic layer to answer.
pub async fn run_to_completion(request: Request, next: Next) -> Response {
    if request.method().is_safe() {
        return next.run(request).await;
    }
    let span = tracing::Span::current();
    let task = tokio::spawn(tracing::Instrument::instrument(next.run(request), span));
    match task.await {
        Ok(response) => response,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            ApiError::Internal(anyhow::anyhow!("request task ended: {error}")).into_response()
        }
    }
}

/// Runs before every handler.
pub async fn guard(State(guarded): State<Guarded>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let Guarded { state, rule } = guarded;
    let timeout = state.limits.request_timeout;
    let outcome = tokio::time::timeout(timeout, admit(&state, rule, request, next)).await;
    let response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => error.into_response(),
        Err(_elapsed) => {
            tracing::warn!(route = rule.path, "request timed out");
            ApiError::Timeout.into_response()
        }
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "ledger_http_requests_total",
        "route" => rule.path, "method" => method.to_string(), "status" => status
    )
    .increment(1);
    metrics::histogram!("ledger_http_request_duration_seconds", "route" => rule.path)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn admit(
    state: &AppState,
    rule: Rule,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let address = client_ip(&request);
    let roles = match rule.access {
        Access::Public => {
            state.limit_rate(&format!("ip:{address}"))?;
            wait_for_min_position(state, rule, &mut request).await?;
            return Ok(next.run(request).await);
        }
        Access::Node => {
            if !state.forwarder.is_node(request.headers()) {
                // Node traffic is not rate limited; failed attempts are.
                state.limit_rate(&format!("ip:{address}"))?;
                return Err(ApiError::Unauthorized);
            }
            return Ok(next.run(request).await);
        }
        Access::Roles(roles) => roles,
    };
    let token = bearer_token(request.headers()).ok_or(ApiError::Unauthorized)?;
    let caller = authenticate(state, token, &address).await?;
    state.limit_rate(&format!("user:{}", caller.user_id))?;
    if !roles.contains(&caller.role) {
        return Err(ApiError::Forbidden);
    }
    request.extensions_mut().insert(caller.clone());
    wait_for_min_position(state, rule, &mut request).await?;
    // A write naming a product that is not listed decides nothing: answered
    // 404 from the engine's memory before its idempotency key is written,
    // so a flood of made-up products costs no write at all.
    if request.method() == Method::POST
        && rule.path.starts_with(PRODUCT_ROUTES)
        && let Some(product_id) = product_in_path(request.uri().path())
        && !state.engine.is_listed(&product_id).await?
    {
        return Err(ApiError::NotFound);
    }
    if request.method() != Method::POST || rule.idempotency == Idempotency::None {
        return Ok(next.run(request).await);
    }
    let key = idempotency_key(request.headers())?;
    match (key, rule.idempotency) {
        (Some(key), _) => idempotent(state, &caller, key, request, next).await,
        (None, Idempotency::Required) => Err(ApiError::InvalidRequest(
            "this route needs an Idempotency-Key header".into(),
        )),
        (None, _) => Ok(next.run(request).await),
    }
}

/// On a route that reads read models: takes `min_position` out of the
/// query and waits until those read models reach it (`fresh`).
async fn wait_for_min_position(
    state: &AppState,
    rule: Rule,
    request: &mut Request,
) -> Result<(), ApiError> {
    if rule.reads.is_empty() {
        return Ok(());
    }
    let Some(query) = request.uri().query() else {
        return Ok(());
    };
    let (min_position, rest) = super::fresh::take_min_position(query)?;
    let Some(min_position) = min_position else {
        return Ok(());
    };
    let path_and_query = if rest.is_empty() {
        request.uri().path().to_owned()
    } else {
        format!("{}?{rest}", request.uri().path())
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ApiError::InvalidRequest("malformed query".into()))?,
    );
    *request.uri_mut() = axum::http::Uri::from_parts(parts)
        .map_err(|_| ApiError::InvalidRequest("malformed query".into()))?;
    super::fresh::wait_for(state, rule.reads, min_position).await
}

/// Routes about one listed product.
const PRODUCT_ROUTES: &str = "/v1/products/{product_id}/";

/// The product a `/v1/products/{product_id}/...` path names, when the
/// segment is a valid product id as written (anything else is left to the
/// handler, which answers 400).
fn product_in_path(path: &str) -> Option<domain::ProductId> {
    let rest = path.strip_prefix("/v1/products/")?;
    let segment = rest.split('/').next()?;
    domain::ProductId::parse(segment).ok()
}

/// The caller a token stands for. Only a token the caches do not know costs
/// a database lookup, and only for an address that has not failed too often
/// lately: failures are counted per address and, past the limit, answered
/// 429 before any lookup.
async fn authenticate(state: &AppState, token: &str, address: &str) -> Result<Caller, ApiError> {
    let now_ms = state.now_ms();
    let token_hash = match state.auth.cached(token, now_ms) {
        Cached::Known(caller) => return Ok(caller),
        Cached::Refused => {
            state.throttle.address_failed(address);
            return Err(ApiError::Unauthorized);
        }
        Cached::Unknown(token_hash) => token_hash,
    };
    state
        .throttle
        .check_address(address)
        .map_err(rate_limited)?;
    match state.auth.lookup(token_hash, now_ms).await {
        Ok(caller) => Ok(caller),
        Err(AuthError::Unauthorized) => {
            state.throttle.address_failed(address);
            Err(ApiError::Unauthorized)
        }
        Err(error) => Err(error.into()),
    }
}

/// A throttle's wait as a 429.
pub fn rate_limited(wait: std::time::Duration) -> ApiError {
    metrics::counter!("ledger_rate_limited_total").increment(1);
    ApiError::RateLimited(wait.as_secs().max(1))
}

/// Runs a POST under its idempotency key: the first request runs, a repeat
/// with the same request gets the stored answer, another request with the
/// key is refused.
async fn idempotent(
    state: &AppState,
    caller: &Caller,
    key: String,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, BODY_BYTES_MAX).await.map_err(|error| {
        if super::transport::is_body_read_timeout(&error) {
            ApiError::BodyTimeout
        } else {
            ApiError::PayloadTooLarge
        }
    })?;
    let request_hash = request_hash(&parts.method, parts.uri.path(), &bytes);
    // A live request ends by the request timeout (the guard cancels it
    // then), so its claim on the key need not outlive it by much: after a
    // crash, retries wait at most this long before taking the key over.
    let lock_ms = i64::try_from(state.limits.request_timeout.as_millis()).unwrap_or(i64::MAX / 2)
        + KEY_LOCK_MARGIN_MS;
    let begun = state
        .keys
        .apply(KeyOp::Begin {
            user_id: caller.user_id.clone(),
            key: key.clone(),
            request_hash,
            now_ms: state.now_ms(),
            lock_ms,
        })
        .await
        .map_err(key_error)?;
    match begun {
        Begun::Run => {}
        Begun::Replay { status, body } => return Ok(replay(status, body)),
        Begun::InFlight => return Err(ApiError::InFlight),
        Begun::Reused => {
            return Err(ApiError::Conflict(
                "idempotency_key_reused",
                "this idempotency key was used for a different request".into(),
            ));
        }
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = response.status();
    // Answers that say "not decided" leave the key free for a retry.
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        let abandon = KeyOp::Abandon {
            user_id: caller.user_id.clone(),
            key,
        };
        if let Err(error) = state.keys.apply(abandon).await {
            tracing::warn!(%error, "could not release an idempotency key; it expires by itself");
        }
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading a response: {e}")))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let complete = KeyOp::Complete {
        user_id: caller.user_id.clone(),
        key,
        status: status.as_u16(),
        body: text,
    };
    if let Err(error) = state.keys.apply(complete).await {
        // The command took effect; a retry after the key's lock runs it
        // again, and every command behind a POST is idempotent itself.
        tracing::warn!(%error, "could not store an idempotent answer");
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

fn key_error(error: KeyError) -> ApiError {
    match error {
        KeyError::Unavailable(_) => ApiError::Unavailable("the database".into()),
        KeyError::Failed(why) => ApiError::Internal(anyhow::anyhow!(why)),
    }
}

fn replay(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).expect("BUG: a stored status is not a status");
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// SHA-256 over the method, path and body: what a key is bound to.
fn request_hash(method: &Method, path: &str, body: &[u8]) -> String {
    let mut material = Vec::with_capacity(method.as_str().len() + path.len() + body.len() + 2);
    material.extend_from_slice(method.as_str().as_bytes());
    material.push(0);
    material.extend_from_slice(path.as_bytes());
    material.push(0);
    material.extend_from_slice(body);
    sha256_hex(&material)
}

/// The `Authorization: Bearer <token>` token, if well-formed.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The `Idempotency-Key` header: 1 to 128 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::InvalidRequest(
            "Idempotency-Key must be 1 to 128 printable ASCII characters".into(),
        )
    };
    let text = value.to_str().map_err(|_| invalid())?;
    let printable = text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if text.is_empty() || text.len() > IDEMPOTENCY_KEY_BYTES_MAX || !printable {
        return Err(invalid());
    }
    Ok(Some(text.to_owned()))
}

/// The client's address (`unknown` when served without a socket, in tests).
fn client_ip(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string())
}

/// The client's address, as rate limits and lockouts key it.
pub struct ClientAddress(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<ClientAddress, ApiError> {
        Ok(ClientAddress(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string()),
        ))
    }
}

/// The authenticated caller (only on routes with a role policy).
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

/// Who asked and within which request: stamped on every event appended.
pub struct Context(pub RequestContext);

impl<S: Send + Sync> FromRequestParts<S> for Context {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Context, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let request_id = parts
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok(Context(RequestContext::user(
            caller.user_id,
            caller.role.as_str(),
            request_id,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write whose caller hangs up half-way still runs to its end; a
    /// read is cancelled with its connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_outlive_a_caller_that_hangs_up() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let finished = Arc::new(AtomicUsize::new(0));
        let slow = {
            let finished = finished.clone();
            move || async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                "done"
            }
        };
        let app = axum::Router::new()
            .route("/slow", axum::routing::post(slow.clone()).get(slow))
            .layer(axum::middleware::from_fn(run_to_completion));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/slow", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(50))
            .build()
            .unwrap();
        assert!(client.get(&url).send().await.unwrap_err().is_timeout());
        assert!(client.post(&url).send().await.unwrap_err().is_timeout());
        // Both calls hung up after 50 ms; only the write reaches its end.
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while finished.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the write never finished");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The read, started first, would have ended by now had it run on.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the read was cancelled");
        server.abort();
    }

    #[test]
    fn product_ids_are_read_from_product_paths_only_when_valid() {
        assert_eq!(
            product_in_path("/v1/products/hot-1/purchases").map(|p| p.as_str().to_owned()),
            Some("hot-1".to_owned())
        );
        assert!(product_in_path("/v1/products/%3Cx%3E/purchases").is_none());
        assert!(product_in_path("/v1/orders/x").is_none());
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain() {
        for good in [
            "a",
            "req-1",
            "0195f3a0-0000-7000-8000-000000000001",
            "a.b_c:d-e",
        ] {
            assert!(is_acceptable_request_id(good.as_bytes()), "{good}");
        }
        assert!(is_acceptable_request_id("x".repeat(64).as_bytes()));
        for bad in ["", "a b", "a/b", "<script>", "é", "a\nb", "' OR 1=1"] {
            assert!(!is_acceptable_request_id(bad.as_bytes()), "{bad}");
        }
        assert!(!is_acceptable_request_id("x".repeat(65).as_bytes()));
    }

    #[test]
    fn request_hashes_bind_method_path_and_body() {
        let a = request_hash(&Method::POST, "/v1/products/a/purchases", b"{\"amount\":1}");
        assert_eq!(
            a,
            request_hash(&Method::POST, "/v1/products/a/purchases", b"{\"amount\":1}")
        );
        assert_ne!(
            a,
            request_hash(&Method::POST, "/v1/products/b/purchases", b"{\"amount\":1}")
        );
        assert_ne!(
            a,
            request_hash(&Method::POST, "/v1/products/a/purchases", b"{\"amount\":2}")
        );
    }
}
