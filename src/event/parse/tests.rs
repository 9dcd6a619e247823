//! Parsing tests: examples of each rule, then properties over any JSON and any bytes.

use super::*;
use crate::event::{now_ms, EventType};
use serde_json::json;

fn parse(v: Value) -> Result<CallEvent, InvalidEvent> {
    CallEvent::parse(v.to_string().as_bytes())
}

#[test]
fn seeds_shape_parses() {
    let e = parse(
        json!({"type":"call.incoming","callId":"11-10","fromUserId":11,
        "fromDisplayName":"User 11","room":"p2p:11-10","hasVideo":true,"toUserId":10}),
    )
    .unwrap();
    assert_eq!(e.event_type, EventType::Incoming);
    assert_eq!(e.call_id, "11-10");
    assert_eq!(e.to_user_id, "10");
    assert_eq!(e.from_user_id, Some(json!(11)));
    assert!(e.has_video);
}

#[test]
fn snake_case_and_string_types_parse_the_same() {
    let e = parse(
        json!({"call_id":"11-10","to_user_id":"10","from_user_id":"11",
        "has_video":"true","from_display_name":"User 11"}),
    )
    .unwrap();
    assert_eq!(
        (e.call_id.as_str(), e.to_user_id.as_str(), e.has_video),
        ("11-10", "10", true)
    );
    for (v, want) in [
        (json!(1), true),
        (json!(0), false),
        (json!("false"), false),
        (json!("1"), true),
    ] {
        assert_eq!(
            parse(json!({"callId":5,"toUserId":6,"hasVideo":v}))
                .unwrap()
                .has_video,
            want
        );
    }
    assert!(
        parse(json!({"callId":5,"toUserId":6,"callType":"video"}))
            .unwrap()
            .has_video
    );
    assert_eq!(
        parse(json!({"callId":5,"toUserId":6})).unwrap().call_id,
        "5"
    );
}

#[test]
fn sent_at_accepts_rfc3339_and_epoch_ms() {
    let a = parse(json!({"callId":"c","toUserId":"u","sentAt":"2026-11-22T10:00:00Z"})).unwrap();
    let b = parse(json!({"callId":"c","toUserId":"u","sentAt":1795341600000i64})).unwrap();
    assert_eq!(a.sent_at_ms, Some(1_795_341_600_000));
    assert_eq!(a.sent_at_ms, b.sent_at_ms);
}

#[test]
fn refusals_name_their_reason_and_call_when_readable() {
    let cases: Vec<(Vec<u8>, InvalidKind, Option<&str>)> = vec![
        (vec![0xff, 0xfe, 0x00], InvalidKind::NotUtf8, None),
        (b"{not json".to_vec(), InvalidKind::NotJson, None),
        (b"[1,2]".to_vec(), InvalidKind::NotAnObject, None),
        (
            br#"{"toUserId":1}"#.to_vec(),
            InvalidKind::MissingField,
            None,
        ),
        (
            br#"{"callId":"c1"}"#.to_vec(),
            InvalidKind::MissingField,
            Some("c1"),
        ),
        (
            br#"{"callId":"c1","toUserId":1,"type":"call.bogus"}"#.to_vec(),
            InvalidKind::UnknownType,
            Some("c1"),
        ),
        (
            br#"{"callId":"c1","toUserId":1,"hasVideo":"maybe"}"#.to_vec(),
            InvalidKind::BadField,
            Some("c1"),
        ),
        (
            br#"{"callId":"c1","toUserId":{"a":1}}"#.to_vec(),
            InvalidKind::MissingField,
            Some("c1"),
        ),
        (
            format!(r#"{{"callId":"{}","toUserId":1}}"#, "x".repeat(65)).into_bytes(),
            InvalidKind::BadField,
            None,
        ),
        (vec![b' '; MAX_EVENT_BYTES + 1], InvalidKind::TooLarge, None),
    ];
    for (body, kind, call) in cases {
        let err = CallEvent::parse(&body).unwrap_err();
        assert_eq!(err.kind, kind, "{err}");
        assert_eq!(err.call_id.as_deref(), call, "{err}");
    }
}

#[test]
fn control_characters_and_nul_in_ids_are_bad_fields_and_never_repeated() {
    for (body, call) in [
        (json!({"callId":"a\nb","toUserId":1}), None),
        (json!({"callId":"a\u{0}b","toUserId":1}), None),
        (json!({"callId":"a\u{7f}","toUserId":1}), None),
        (json!({"callId":"a\u{85}b","toUserId":1}), None),
        (json!({"callId":"c1","toUserId":"u\u{0}"}), Some("c1")),
        (
            json!({"callId":"c1","toUserId":"u\r\nX-Injected: 1"}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":1,"bundleId":"com.x\u{1}"}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":1,"reason":"r\u{0}"}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":1,"answeredDeviceId":"7\t8"}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":"x".repeat(257)}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":1,"fromDisplayName":"A\u{0}"}),
            Some("c1"),
        ),
        (
            json!({"callId":"c1","toUserId":1,"room":{"k\u{0}":1}}),
            Some("c1"),
        ),
    ] {
        let err = parse(body.clone()).unwrap_err();
        assert_eq!(err.kind, InvalidKind::BadField, "{body}: {err}");
        assert_eq!(err.call_id.as_deref(), call, "{body}");
    }
}

#[test]
fn sent_at_outside_plausible_epoch_ms_is_refused() {
    let now = now_ms();
    for bad in [
        json!(now / 1000),
        json!(now * 1000),
        json!(now as i128 * 1_000_000),
        json!(-1),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e300),
        json!("-9999999999999"),
        json!("1969-12-31T23:59:59Z"),
        json!("9999-12-31T23:59:59Z"),
    ] {
        let err = parse(json!({"callId":"c","toUserId":"u","sentAt":bad})).unwrap_err();
        assert_eq!(err.kind, InvalidKind::BadField, "{bad}: {err}");
    }
    let ok = parse(json!({"callId":"c","toUserId":"u","sentAt":now as f64})).unwrap();
    assert_eq!(ok.sent_at_ms, Some(now));
}

#[test]
fn ring_timeout_is_clamped_to_the_configured_maximum() {
    let limits = Limits {
        max_ring_timeout_secs: 90,
    };
    let parse_with = |v: Value| CallEvent::parse_with(v.to_string().as_bytes(), &limits);
    for (given, want) in [
        (json!(30), 30),
        (json!(90), 90),
        (json!(91), 90),
        (json!(u64::MAX), 90),
        (json!("100000"), 90),
    ] {
        let e = parse_with(json!({"callId":"c","toUserId":"u","ringTimeoutSecs":given})).unwrap();
        assert_eq!(e.ring_timeout_secs, Some(want), "{given}");
    }
    for bad in [json!(0), json!(-5), json!(1.5), json!("soon")] {
        let err =
            parse_with(json!({"callId":"c","toUserId":"u","ringTimeoutSecs":bad})).unwrap_err();
        assert_eq!(err.kind, InvalidKind::BadField, "{bad}");
    }
}

#[test]
fn long_pass_through_fields_are_cut_to_fit_the_voip_payload() {
    let long = "名".repeat(1500);
    let quotes = "\"\u{1}".repeat(600);
    let e = parse(json!({"callId":"c","toUserId":"u","fromDisplayName":long,
        "room":quotes,"fromUserId":long}))
    .unwrap();
    let shown = e.from_display_name.as_ref().unwrap().as_str().unwrap();
    assert!(!shown.is_empty() && long.starts_with(shown));
    let payload = e.device_payload(now_ms(), now_ms() + 45_000).to_string();
    assert!(
        payload.len() <= crate::pipeline::MAX_VOIP_PAYLOAD,
        "{}",
        payload.len()
    );
    let big_object = json!({"callId":"c","toUserId":"u","room":{"k":"v".repeat(600)}});
    assert_eq!(parse(big_object).unwrap_err().kind, InvalidKind::BadField);
}

#[test]
fn ring_window_never_overflows_and_distrusts_far_future_starts() {
    let now = now_ms();
    let e = parse(json!({"callId":"c","toUserId":"u"})).unwrap();
    assert_eq!(e.ring_window(Some(u64::MAX), 45, now), (now, now + 45_000));
    assert_eq!(e.ring_window(Some(1), u64::MAX, now).0, now);
    let sent = (now / 1000 - 10) as u64;
    assert_eq!(e.ring_window(Some(sent), 45, now).0, sent as i64 * 1000);
    let ahead = parse(json!({"callId":"c","toUserId":"u","sentAt": now + 3_600_000})).unwrap();
    assert_eq!(ahead.ring_window(None, 45, now), (now, now + 45_000));
}

mod properties {
    use super::*;
    use crate::apns::request::{build_request, PushRequest};
    use proptest::prelude::*;

    /// Strings of the kinds producers get wrong: control characters, NUL,
    /// quotes, multi-byte text, and long runs.
    fn hostile_string() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z0-9\\-]{1,70}",
            "[\\x00-\\x1f\\x7f\"\\\\ a]{0,12}",
            ("[a-z]{0,4}", any::<char>(), "[a-z]{0,4}").prop_map(|(a, c, b)| format!("{a}{c}{b}")),
            (any::<char>(), 0usize..3000).prop_map(|(c, n)| c.to_string().repeat(n)),
        ]
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (SENT_AT_MIN_MS - 10..SENT_AT_MAX_MS + 10).prop_map(Value::from),
            (0u64..200).prop_map(Value::from),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number(),
            hostile_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(hostile_string(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: &[&str] = &[
        "callId",
        "call_id",
        "toUserId",
        "to_user_id",
        "type",
        "sentAt",
        "ringTimeoutSecs",
        "fromUserId",
        "fromDisplayName",
        "room",
        "hasVideo",
        "callType",
        "bundleId",
        "reason",
        "answeredDeviceId",
    ];

    /// Objects with the event's field names (and others) holding any value.
    fn event_like() -> impl Strategy<Value = Value> {
        let entry = prop_oneof![
            4 => (prop::sample::select(FIELDS), json_value()).prop_map(|(k, v)| (k.to_string(), v)),
            1 => (hostile_string(), json_value()),
        ];
        (
            hostile_string(),
            hostile_string(),
            prop::collection::vec(entry, 0..10),
        )
            .prop_map(|(call, to, entries)| {
                let mut m = Map::new();
                m.insert("callId".into(), Value::String(call));
                m.insert("toUserId".into(), Value::String(to));
                m.extend(entries);
                Value::Object(m)
            })
    }

    /// What every accepted event must satisfy: its request builds, its Postgres
    /// parameters are valid text, its payload fits and its times compute.
    fn assert_usable(e: &CallEvent, timestamp: Option<u64>) {
        for text in [
            Some(&e.call_id),
            Some(&e.to_user_id),
            e.bundle_id.as_ref(),
            e.reason.as_ref(),
            e.answered_device_id.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            assert!(!text.contains('\0'), "{text:?}");
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
        let now = now_ms();
        let (sent_at, expires_at) = e.ring_window(timestamp, 45, now);
        assert!(expires_at >= sent_at);
        let payload = e.device_payload(sent_at, expires_at).to_string();
        // What a ring sends is serialised from the event's fields directly: the
        // same bytes as the payload's map (keys in order, nothing left out).
        let sent = e.device_payload_bytes(sent_at, expires_at);
        assert_eq!(std::str::from_utf8(&sent).unwrap(), payload);
        assert!(
            payload.len() <= crate::pipeline::MAX_VOIP_PAYLOAD,
            "payload {} bytes",
            payload.len()
        );
        assert!(!payload.contains("\\u0000"), "jsonb refuses NUL: {payload}");
        let req = PushRequest {
            push_type: Default::default(),
            token: "00".repeat(32),
            topic: "com.example.app.voip".into(),
            provider_token: "eyJ.x.y".into(),
            apns_id: uuid::Uuid::nil(),
            expiration: (expires_at / 1000).max(0) as u64,
            priority: 10,
            collapse_id: e.call_id.clone(),
            payload: sent,
        };
        if let Err(err) = build_request("https://127.0.0.1:2197", &req) {
            panic!("request for {:?} does not build: {err}", e.call_id);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn any_event_like_json_is_refused_with_a_reason_or_usable(
            v in event_like(),
            timestamp in prop::option::of(any::<u64>()),
        ) {
            match CallEvent::parse(v.to_string().as_bytes()) {
                Ok(e) => assert_usable(&e, timestamp),
                Err(err) => {
                    prop_assert!(!err.message.is_empty());
                    if let Some(c) = &err.call_id {
                        prop_assert!(check_text("callId", c, crate::event::MAX_CALL_ID_BYTES).is_ok());
                    }
                }
            }
        }

        #[test]
        fn any_json_value_parses_or_is_refused(v in json_value()) {
            if let Ok(e) = CallEvent::parse(v.to_string().as_bytes()) {
                assert_usable(&e, None);
            }
        }

        #[test]
        fn any_bytes_parse_or_are_refused(body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(e) = CallEvent::parse(&body) {
                assert_usable(&e, None);
            }
        }
    }
}
