//! Login, users, and the money routes of accounts (balances, ledger,
//! deposits).

use super::AppState;
use super::auth::{self, AuthError, Caller, Role};
use super::error::{ApiError, ErrorBody};
use super::guard::{ClientAddress, Context, bearer_token, rate_limited};
use super::model::{
    AccountResponse, CreateUserRequest, CreateUserResponse, DepositRequest, DepositResponse,
    JsonBody, LedgerResponse, LoginRequest, LoginResponse, MeResponse, PathText, positive_amount,
};
use crate::audit::AsOf;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use domain::account::{AccountCommand, AccountEvent, CustomerAccount};
use domain::ids::validate_reference;
use domain::{AccountId, Currency};
use projections::query;
use serde::Deserialize;
use uuid::Uuid;

/// Ledger entries per page when `limit` is not given.
pub const LEDGER_PAGE_DEFAULT: u32 = 100;

/// `POST /v1/auth/login`.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    // Cheap checks first: a locked-out username or a failing address is
    // refused before any password hash.
    state
        .throttle
        .check_login(&request.username, &address)
        .map_err(rate_limited)?;
    let now_ms = state.now_ms();
    let session = match state
        .auth
        .login(&request.username, &request.password, now_ms)
        .await
    {
        Ok(session) => session,
        Err(AuthError::Unauthorized) => {
            state.throttle.login_failed(&request.username, &address);
            return Err(ApiError::Unauthorized);
        }
        Err(error) => return Err(error.into()),
    };
    state.throttle.login_succeeded(&request.username, &address);
    let role = Role::parse(&session.user.role).expect("BUG: a stored role is not a role");
    let ttl = chrono::Duration::from_std(state.limits.session_ttl).unwrap_or(chrono::Duration::MAX);
    let expires_at = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default() + ttl;
    tracing::info!(user_id = %session.user.user_id, role = role.as_str(), "login");
    Ok(Json(LoginResponse {
        token: session.token,
        role,
        user_id: session.user.user_id,
        account_id: session.user.account_id,
        expires_at: expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }))
}

/// `POST /v1/auth/logout`: ends the caller's session; its token answers
/// 401 from then on, on every node within a second.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "The session ended"), (status = 401, body = ErrorBody)))]
pub async fn logout(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<StatusCode, ApiError> {
    let token = bearer_token(&headers).ok_or(ApiError::Unauthorized)?;
    state.auth.logout(token, state.now_ms()).await?;
    tracing::info!(user_id = %caller.user_id, "logout");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/me`: who the token belongs to.
#[utoipa::path(get, path = "/v1/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = MeResponse), (status = 401, body = ErrorBody)))]
pub async fn me(caller: Caller) -> Json<MeResponse> {
    Json(MeResponse {
        user_id: caller.user_id,
        role: caller.role,
        account_id: caller.account_id,
    })
}

/// `POST /v1/users` (admin): a user; a customer also gets an account.
#[utoipa::path(post, path = "/v1/users", tag = "users", security(("bearer" = [])),
    request_body = CreateUserRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 201, body = CreateUserResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Context(context): Context,
    JsonBody(request): JsonBody<CreateUserRequest>,
) -> Result<(StatusCode, Json<CreateUserResponse>), ApiError> {
    auth::validate_username(&request.username)
        .map_err(|why| ApiError::InvalidRequest(why.into()))?;
    auth::validate_password(&request.password)
        .map_err(|why| ApiError::InvalidRequest(why.into()))?;
    let account_id = (request.role == Role::Customer).then(|| AccountId(Uuid::now_v7()));
    let mut position = None;
    let created = state
        .auth
        .create_user(
            &request.username,
            &request.password,
            request.role,
            account_id.map(|id| id.to_string()),
            state.now_ms(),
        )
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::Conflict("conflict", "this username is taken".into()))?;
    if let Some(account_id) = account_id {
        let open = AccountCommand::Open {
            account_id,
            currency: Currency::CNY,
        };
        match state
            .engine
            .account_command(account_id, open, context)
            .await
        {
            Ok(appended) => {
                position = Some(super::products::position_reached(&state, appended).await?);
            }
            Err(error) => {
                // Without its account the user could not buy: take it back.
                state.access.delete_user(&created.user_id).await?;
                return Err(ApiError::from(error));
            }
        }
    }
    tracing::info!(user_id = %created.user_id, role = request.role.as_str(), "user created");
    Ok((
        StatusCode::CREATED,
        Json(CreateUserResponse {
            user_id: created.user_id,
            account_id: created.account_id,
            position,
        }),
    ))
}

/// An account id from a path; a customer may only name their own (another
/// is answered as if it did not exist).
pub fn visible_account(caller: &Caller, text: &str) -> Result<AccountId, ApiError> {
    let account_id = Uuid::parse_str(text)
        .map(AccountId)
        .map_err(|_| ApiError::InvalidRequest("account_id is not a UUID".into()))?;
    if caller.role == Role::Customer
        && caller.account_id.as_deref() != Some(&account_id.to_string())
    {
        return Err(ApiError::NotFound);
    }
    Ok(account_id)
}

/// `GET /v1/accounts/{account_id}`: balances.
#[utoipa::path(get, path = "/v1/accounts/{account_id}", tag = "accounts", security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"),
        AsOfParams),
    responses((status = 200, body = AccountResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn account(
    State(state): State<AppState>,
    caller: Caller,
    PathText(account_id): PathText,
    params: Result<Query<AsOfParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AccountResponse>, ApiError> {
    let account_id = visible_account(&caller, &account_id)?;
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    if let Some(as_of) = params.as_of {
        let as_of: AsOf = as_of.parse().map_err(ApiError::InvalidRequest)?;
        return balance_as_of(state.store.as_ref(), &state.db, account_id, as_of)
            .await
            .map(Json);
    }
    query::balance(&state.db, &account_id.to_string())
        .await?
        .map(|b| Json(AccountResponse::from(b)))
        .ok_or(ApiError::NotFound)
}

/// Paging of a ledger.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerParams {
    /// Entries after this position (0: from the start).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// 1 to 1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// `GET /v1/accounts/{account_id}/ledger`: entries, oldest first.
#[utoipa::path(get, path = "/v1/accounts/{account_id}/ledger", tag = "accounts",
    security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"), LedgerParams),
    responses((status = 200, body = LedgerResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn ledger(
    State(state): State<AppState>,
    caller: Caller,
    PathText(account_id): PathText,
    params: Result<Query<LedgerParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LedgerResponse>, ApiError> {
    let account_id = visible_account(&caller, &account_id)?;
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = params.limit.unwrap_or(LEDGER_PAGE_DEFAULT);
    if !(1..=query::LEDGER_PAGE_MAX).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be 1 to 1000".into()));
    }
    let after = params.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::InvalidRequest(
            "after must not be negative".into(),
        ));
    }
    let id = account_id.to_string();
    if query::balance(&state.db, &id).await?.is_none() {
        return Err(ApiError::NotFound);
    }
    let page = query::ledger(&state.db, &id, after, limit).await?;
    Ok(Json(LedgerResponse::from(page)))
}

/// `POST /v1/accounts/{account_id}/deposits` (operator).
#[utoipa::path(post, path = "/v1/accounts/{account_id}/deposits", tag = "accounts",
    security(("bearer" = [])), request_body = DepositRequest,
    params(("account_id" = String, Path, description = "The account",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 201, body = DepositResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn deposit(
    State(state): State<AppState>,
    Context(context): Context,
    caller: Caller,
    PathText(account_id): PathText,
    JsonBody(request): JsonBody<DepositRequest>,
) -> Result<(StatusCode, Json<DepositResponse>), ApiError> {
    let account_id = visible_account(&caller, &account_id)?;
    let amount = positive_amount(request.amount)?;
    validate_reference(&request.reference).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let command = AccountCommand::Deposit {
        amount,
        reference: request.reference.clone(),
    };
    let appended = state
        .engine
        .account_command(account_id, command, context)
        .await
        .map_err(ApiError::from)?;
    let position = match appended {
        Some(appended) => appended.last_position,
        None => deposit_position(&state, account_id, &request.reference).await?,
    };
    let (account, _) = state.engine.account(account_id).await?;
    let account = account
        .account
        .expect("BUG: a deposit succeeded on an account that is not open");
    Ok((
        StatusCode::CREATED,
        Json(DepositResponse {
            account_id: account_id.to_string(),
            available: account.available.minor(),
            position,
        }),
    ))
}

/// Where the deposit with this reference was recorded (a repeated deposit
/// answers with the first one's position).
async fn deposit_position(
    state: &AppState,
    account_id: AccountId,
    reference: &str,
) -> Result<i64, ApiError> {
    let events = state.store.read_stream_to_end(&account_id.stream()).await?;
    events
        .iter()
        .find(|event| {
            matches!(
                engine::aggregate::decode::<CustomerAccount>(event),
                Ok(AccountEvent::FundsDeposited { reference: r, .. }) if r == reference
            )
        })
        .map(|event| event.position)
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a repeated deposit has no event")))
}

/// `?as_of=` on an account.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AsOfParams {
    /// A log position, or an RFC 3339 time: the balances as they stood then.
    pub as_of: Option<String>,
}

/// An account's balances as of a point in history, folded from its own
/// stream; `held` counts purchases debited then whose order was neither
/// confirmed nor refunded then (from each order's timeline).
pub async fn balance_as_of(
    store: &dyn store::EventStore,
    db: &projections::ReadDb,
    account_id: AccountId,
    as_of: AsOf,
) -> Result<AccountResponse, ApiError> {
    let events = store.read_stream_to_end(&account_id.stream()).await?;
    let mut account = domain::account::AccountState::default();
    let mut version = 0;
    for recorded in events.iter().filter(|e| as_of.covers(e)) {
        let event = engine::aggregate::decode::<CustomerAccount>(recorded)?;
        account = <CustomerAccount as domain::Decider>::evolve(account, &event);
        version = recorded.version;
    }
    let Some(open) = account.account else {
        return Err(ApiError::NotFound);
    };
    let mut held = 0i64;
    for (order_id, purchase) in &open.purchases {
        if purchase.refunded {
            continue;
        }
        let timeline = query::timeline(db, store, &order_id.to_string()).await?;
        let confirmed = timeline.iter().any(|event| {
            let within = match as_of {
                AsOf::Position(position) => event.position <= position,
                AsOf::Time(time) => chrono::DateTime::parse_from_rfc3339(&event.occurred_at)
                    .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= time),
            };
            within && event.event_type == "reservation_confirmed"
        });
        if !confirmed {
            held += purchase.amount.minor();
        }
    }
    Ok(AccountResponse {
        account_id: account_id.to_string(),
        available: open.available.minor(),
        held,
        total_deposited: open.total_deposited.minor(),
        total_invested: open.total_invested.minor(),
        total_paid_out: open.total_paid_out.minor(),
        version,
    })
}
