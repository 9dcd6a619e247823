//! Integration tests: one binary, against real RabbitMQ, real Postgres and the
//! APNs simulator over TLS + HTTP/2. Each test isolates itself (own database,
//! own AMQP names, own simulator), so they run in parallel and can be re-run.

mod api;
mod apns;
mod apns_connections;
mod apns_sim_rules;
mod batch_metrics;
mod batching;
mod bounds;
mod call_status;
mod cancel_modes;
mod cancel_user;
mod cancelled_copies;
mod certs;
mod cli;
mod common;
mod connections;
mod delivery;
mod doctor;
mod doctor_certs;
mod doctor_services;
mod faults;
mod hostile;
mod lifecycle;
mod misconfig;
mod ops;
mod pipeline;
mod routing;
mod settling;
mod successes;
mod tls;
mod tls_fixtures;
mod trace;
mod upgrade;
mod wire;
