//! A copy of a ring that comes after its call was cancelled claims nothing;
//! what the admitting statement tells it of each device, against real
//! Postgres and real liveness sessions: a device whose claim a live worker
//! holds is that worker's to publish (`Busy`), one nobody holds is the copy's
//! (`Unclaimed`: it publishes `cancelled`), one published is `Done`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voip_push_worker::event::Environment;
use voip_push_worker::store::admit::Admitted;
use voip_push_worker::store::claims::Claim;
use voip_push_worker::store::liveness::Liveness;

use crate::batching::ring;
use crate::common::{eventually, TestEnv};

const USER: &str = "cc-user";

/// Each device's claim as a copy of the ring (another owner) finds it.
async fn copy_finds(env: &TestEnv, devices: &[i64]) -> Vec<Claim> {
    let admitted: Admitted = (env.store)
        .admit_ring(ring("cc-event", "cc-call", USER, "copy-worker/2"))
        .await
        .unwrap();
    assert_eq!(admitted.devices.len(), devices.len());
    devices
        .iter()
        .map(|id| {
            let (_, claim) = admitted.devices.iter().find(|(d, _)| d.id == *id).unwrap();
            claim.clone()
        })
        .collect()
}

#[tokio::test]
async fn a_cancelled_calls_copy_leaves_live_owners_devices_to_them() {
    let env = TestEnv::without_worker(|_| {}).await;
    let device = || env.device(USER, Some(Environment::Production), Environment::Production);
    let (_, _) = (device().await, device().await);
    let stop = CancellationToken::new();
    let live = Liveness::start(&env.cfg.postgres, stop.clone())
        .await
        .unwrap();
    // The ring, on the live worker, claims both devices.
    let owner = format!("{}/1", live.worker_id);
    let first = (env.store)
        .admit_ring(ring("cc-event", "cc-call", USER, &owner))
        .await
        .unwrap();
    let ids: Vec<i64> = first.devices.iter().map(|(d, _)| d.id).collect();
    assert!(first.devices.iter().all(|(_, c)| *c == Claim::Push));
    // A third device, registered after the ring: no claim at all.
    device().await;
    let client = env.db.client().await;
    let third: i64 = client
        .query_one(
            "SELECT id FROM devices WHERE user_id = $1 AND NOT (id = ANY($2))",
            &[&USER, &ids],
        )
        .await
        .unwrap()
        .get(0);
    // The first device's result is published; then the call is cancelled.
    client
        .execute(
            "UPDATE delivery_claims SET published_at = now() WHERE device_id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE calls SET state = 'cancelled' WHERE call_id = 'cc-call'",
            &[],
        )
        .await
        .unwrap();

    let all = [ids[0], ids[1], third];
    assert_eq!(
        copy_finds(&env, &all).await,
        vec![Claim::Done, Claim::Busy, Claim::Unclaimed],
        "published, held by a live worker, never claimed"
    );

    // The owner dies (its liveness session ends): nobody pushes its device now.
    stop.cancel();
    eventually(
        "the dead owner's device is unclaimed",
        Duration::from_secs(10),
        || async {
            let found = copy_finds(&env, &all).await;
            (found == vec![Claim::Done, Claim::Unclaimed, Claim::Unclaimed]).then_some(())
        },
    )
    .await;
    env.cleanup().await;
}
