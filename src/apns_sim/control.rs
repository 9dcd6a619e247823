//! The simulator's control API (plain HTTP, JSON): register tokens, script
//! answers, list and forget what was received.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{reset_state, RecordedRequest, Scripted, SimState, TokenRegistration};

pub(super) fn control_router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/tokens", post(control_tokens))
        .route("/requests", get(control_requests))
        .route("/reset", post(control_reset))
        .route("/script", post(control_script))
        .with_state(state)
}

async fn control_tokens(
    State(s): State<Arc<SimState>>,
    Json(regs): Json<Vec<TokenRegistration>>,
) -> Json<serde_json::Value> {
    let mut tokens = s.tokens.lock().expect("sim lock");
    for r in &regs {
        tokens.insert(
            (r.environment, r.token.to_ascii_lowercase()),
            (r.bundle_id.clone(), r.kind),
        );
    }
    Json(serde_json::json!({ "registered": regs.len() }))
}

async fn control_requests(State(s): State<Arc<SimState>>) -> Json<Vec<RecordedRequest>> {
    Json(s.requests.lock().expect("sim lock").clone())
}

async fn control_reset(State(s): State<Arc<SimState>>) -> Json<serde_json::Value> {
    reset_state(&s);
    Json(serde_json::json!({ "reset": true }))
}

#[derive(Deserialize)]
struct ScriptBody {
    token: String,
    responses: Vec<Scripted>,
}

async fn control_script(
    State(s): State<Arc<SimState>>,
    Json(b): Json<ScriptBody>,
) -> Json<serde_json::Value> {
    let n = b.responses.len();
    s.scripts
        .lock()
        .expect("sim lock")
        .entry(b.token.to_ascii_lowercase())
        .or_default()
        .extend(b.responses);
    Json(serde_json::json!({ "scripted": n }))
}
