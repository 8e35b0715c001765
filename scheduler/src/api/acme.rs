//! `GET`/`POST`/`DELETE /v1/dns/acme-challenge`: the TXT values of ACME DNS-01 challenges
//! (stored by [`crate::dns_records`], answered by every DNS server following the store).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::dns_records::{
    AcmeChallengeList, AcmeCleared, ClearAcmeChallenges, SetAcmeChallenge, clear_challenges,
    list_challenges, set_challenge,
};
use crate::error::ApiError;

pub(crate) async fn post(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<SetAcmeChallenge>,
) -> Result<Response, ApiError> {
    let now = h.clock.now_ms();
    let (rec, created) = set_challenge(h.store.as_ref(), &h.config.domain, now, req).await?;
    let status = if created {
        http::StatusCode::CREATED
    } else {
        http::StatusCode::OK
    };
    Ok((status, Json(rec)).into_response())
}

pub(crate) async fn delete(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<ClearAcmeChallenges>,
) -> Result<Json<AcmeCleared>, ApiError> {
    let deleted = clear_challenges(h.store.as_ref(), &h.config.domain, req).await?;
    Ok(Json(AcmeCleared { deleted }))
}

pub(crate) async fn list(State(h): State<Handles>) -> Result<Json<AcmeChallengeList>, ApiError> {
    Ok(Json(AcmeChallengeList {
        challenges: list_challenges(h.store.as_ref()).await?,
    }))
}
