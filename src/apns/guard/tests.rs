use proptest::prelude::*;

use super::*;
use Environment::{Production as P, Sandbox as S};

#[test]
fn a_refusal_before_any_success_is_held_and_applied_once_proven() {
    let g = AppGuard::new(10);
    assert_eq!(
        g.token_refused(1, &[P], "DeviceTokenNotForTopic", 5),
        Verdict::Hold {
            misconfigured: false
        }
    );
    assert_eq!(g.suspects(), 1);
    let proof = g.succeeded(2, P);
    assert_eq!(proof.apply.len(), 1);
    assert_eq!(
        (
            proof.apply[0].device_id,
            proof.apply[0].reason.as_str(),
            proof.apply[0].at_ms
        ),
        (1, "DeviceTokenNotForTopic", 5)
    );
    assert!(!proof.recovered);
    // Proven now: the next refusal is applied at once.
    assert_eq!(
        g.token_refused(3, &[P], "DeviceTokenNotForTopic", 6),
        Verdict::Apply
    );
}

#[test]
fn each_environment_that_refused_must_be_proven() {
    let g = AppGuard::new(10);
    g.succeeded(9, P);
    // BadDeviceToken in both: production's proof is not enough.
    assert_eq!(
        g.token_refused(1, &[P, S], "BadDeviceToken", 1),
        Verdict::Hold {
            misconfigured: false
        }
    );
    assert!(g.succeeded(8, P).apply.is_empty());
    let proof = g.succeeded(7, S);
    assert_eq!(
        proof.apply.iter().map(|h| h.device_id).collect::<Vec<_>>(),
        [1]
    );
    // A sandbox proof does not prove production for a device refused there only.
    let g = AppGuard::new(10);
    g.succeeded(9, S);
    assert!(matches!(
        g.token_refused(1, &[P], "x", 1),
        Verdict::Hold { .. }
    ));
}

#[test]
fn a_device_that_succeeds_clears_its_own_suspicion() {
    let g = AppGuard::new(10);
    assert!(matches!(
        g.token_refused(1, &[P], "DeviceTokenNotForTopic", 1),
        Verdict::Hold { .. }
    ));
    assert_eq!(g.suspects(), 1);
    assert_eq!(g.succeeded(1, P).apply, []);
    assert_eq!(g.suspects(), 0);
}

#[test]
fn many_devices_refused_with_no_success_mark_the_app_until_a_success() {
    let g = AppGuard::new(3);
    for d in 0..2 {
        assert_eq!(
            g.token_refused(d, &[P], "DeviceTokenNotForTopic", 1),
            Verdict::Hold {
                misconfigured: false
            }
        );
    }
    // The same device again is not another device.
    g.token_refused(1, &[P], "DeviceTokenNotForTopic", 2);
    assert!(!g.is_misconfigured());
    assert!(g.app_refused(7), "a refused topic counts too");
    assert_eq!(
        g.token_refused(8, &[P], "DeviceTokenNotForTopic", 3),
        Verdict::Hold {
            misconfigured: true
        }
    );
    assert_eq!(
        g.suspects(),
        0,
        "a misconfiguration's refusals are forgotten"
    );
    let proof = g.succeeded(100, P);
    assert!(proof.recovered);
    assert_eq!(
        proof.apply,
        [],
        "nothing held through a misconfiguration is applied"
    );
    assert!(!g.is_misconfigured());
    // Proven now: a device refused again is refused for itself.
    assert_eq!(
        g.token_refused(8, &[P], "DeviceTokenNotForTopic", 4),
        Verdict::Apply
    );
}

#[test]
fn a_burst_of_refusals_after_a_proof_takes_the_proof_back() {
    let g = AppGuard::new(3);
    g.succeeded(100, P);
    assert_eq!(
        g.token_refused(1, &[P], "BadDeviceToken", 1),
        Verdict::Apply
    );
    assert_eq!(
        g.token_refused(2, &[P], "BadDeviceToken", 1),
        Verdict::Apply
    );
    // The third in a row with no success: APNs refuses everything now.
    assert!(matches!(
        g.token_refused(3, &[P], "BadDeviceToken", 1),
        Verdict::Hold { .. }
    ));
    assert!(matches!(
        g.token_refused(4, &[P], "BadDeviceToken", 1),
        Verdict::Hold { .. }
    ));
    assert_eq!(g.succeeded(100, P).apply.len(), 2);
}

#[test]
fn held_refusals_are_bounded() {
    let g = AppGuard::new(usize::MAX);
    for d in 0..(MAX_SUSPECTS as i64 + 5) {
        g.token_refused(d, &[P], "BadDeviceToken", 1);
    }
    assert_eq!(g.suspects(), MAX_SUSPECTS);
}

#[derive(Clone, Debug)]
enum Op {
    Refuse(i64, Vec<Environment>),
    RefuseApp(i64),
    Succeed(i64, Environment),
}

fn env() -> impl Strategy<Value = Environment> {
    prop_oneof![Just(P), Just(S)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..12i64, prop_oneof![Just(vec![P]), Just(vec![S]), Just(vec![P, S])])
            .prop_map(|(d, e)| Op::Refuse(d, e)),
        1 => (0..12i64).prop_map(Op::RefuseApp),
        2 => (0..12i64, env()).prop_map(|(d, e)| Op::Succeed(d, e)),
    ]
}

proptest! {
    /// Whatever the interleaving: a refusal is applied only in environments where
    /// a device succeeded earlier (never before a success), a held device is
    /// never applied at its own success, nothing held through a
    /// misconfiguration is applied, and the app is misconfigured exactly when
    /// `threshold` distinct devices were refused since its last success.
    #[test]
    fn no_refusal_is_applied_before_a_success(
        ops in proptest::collection::vec(op(), 0..80),
        threshold in 1usize..6,
    ) {
        let g = AppGuard::new(threshold);
        // Environments in which some device has succeeded so far, and by whom.
        let mut succeeded_in: [HashSet<i64>; 2] = Default::default();
        let mut refused: HashMap<i64, [bool; 2]> = HashMap::new();
        let mut since_success: HashSet<i64> = HashSet::new();
        for op in ops {
            match op {
                Op::Refuse(d, envs) => {
                    let verdict = g.token_refused(d, &envs, "BadDeviceToken", 1);
                    if verdict == Verdict::Apply {
                        for e in &envs {
                            prop_assert!(
                                !succeeded_in[index(*e)].is_empty(),
                                "applied in {:?} before any success there", e
                            );
                        }
                        refused.remove(&d);
                    } else {
                        let r = refused.entry(d).or_default();
                        for e in &envs {
                            r[index(*e)] = true;
                        }
                        since_success.insert(d);
                        let misconfigured = since_success.len() >= threshold;
                        if misconfigured {
                            refused.clear();
                        }
                        prop_assert_eq!(verdict, Verdict::Hold { misconfigured });
                    }
                }
                Op::RefuseApp(d) => {
                    since_success.insert(d);
                    let misconfigured = since_success.len() >= threshold;
                    if misconfigured {
                        refused.clear();
                    }
                    prop_assert_eq!(g.app_refused(d), misconfigured);
                }
                Op::Succeed(d, e) => {
                    succeeded_in[index(e)].insert(d);
                    let was = since_success.len() >= threshold;
                    since_success.clear();
                    refused.remove(&d);
                    let proof = g.succeeded(d, e);
                    prop_assert_eq!(proof.recovered, was);
                    for h in proof.apply {
                        prop_assert_ne!(h.device_id, d, "applied at its own success");
                        let r = refused.remove(&h.device_id).expect("only what was held");
                        for i in 0..2 {
                            prop_assert!(!r[i] || !succeeded_in[i].is_empty());
                        }
                    }
                }
            }
            prop_assert_eq!(g.is_misconfigured(), since_success.len() >= threshold);
        }
    }

    /// With no success at all, nothing is ever applied.
    #[test]
    fn without_a_success_nothing_is_applied(
        refusals in proptest::collection::vec((0..50i64, prop_oneof![Just(vec![P]), Just(vec![S]), Just(vec![P, S])]), 0..200),
    ) {
        let g = AppGuard::new(10);
        for (d, envs) in refusals {
            let held = matches!(
                g.token_refused(d, &envs, "DeviceTokenNotForTopic", 1),
                Verdict::Hold { .. }
            );
            prop_assert!(held);
        }
    }
}

#[test]
fn an_environment_is_proven_by_a_success_and_unproven_by_a_burst() {
    let g = AppGuard::new(3);
    assert!(!g.is_proven(P) && !g.is_proven(S));
    g.succeeded(1, P);
    assert!(g.is_proven(P) && !g.is_proven(S));
    // Refusals applied in a row up to the threshold take the proof back.
    for d in 10..13 {
        g.token_refused(d, &[P], "DeviceTokenNotForTopic", 1);
    }
    assert!(!g.is_proven(P));
}
