//! Signing, verifying, keys and the claim rules.

use super::*;
use serde_json::json;

const NOW: i64 = 1_800_000_000;

#[test]
fn hs256_round_trip_and_refusals() {
    let header = json!({"alg":"HS256","typ":"JWT"});
    let good = sign_hs256(&header, &json!({"sub":"10","exp":NOW + 600}), b"s3cret");
    let v = Verifier::hs256(b"s3cret");
    assert_eq!(subject(&v.verify(&good, NOW).unwrap()).unwrap(), "10");
    assert_eq!(
        Verifier::hs256(b"other").verify(&good, NOW),
        Err(JwtError::BadSignature)
    );
    let expired = sign_hs256(&header, &json!({"sub":"10","exp":NOW - 120}), b"s3cret");
    assert_eq!(v.verify(&expired, NOW), Err(JwtError::Expired));
    let within_leeway = sign_hs256(&header, &json!({"sub":10,"exp":NOW - 30}), b"s3cret");
    assert_eq!(
        subject(&v.verify(&within_leeway, NOW).unwrap()).unwrap(),
        "10"
    );
    let early = sign_hs256(
        &header,
        &json!({"sub":"10","nbf":NOW + 600,"exp":NOW + 900}),
        b"s3cret",
    );
    assert_eq!(v.verify(&early, NOW), Err(JwtError::NotYetValid));
    let forever = sign_hs256(&header, &json!({"sub":"10"}), b"s3cret");
    assert_eq!(v.verify(&forever, NOW), Err(JwtError::NoExpiry));
    let far = sign_hs256(&header, &json!({"sub":"10","exp":i64::MAX}), b"s3cret");
    assert!(v.verify(&far, i64::MAX).is_ok());
    let nul = sign_hs256(&header, &json!({"sub":"1\u{0}","exp":NOW + 60}), b"s3cret");
    assert_eq!(
        subject(&v.verify(&nul, NOW).unwrap()),
        Err(JwtError::NoSubject)
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(r#"{"sub":"10"}"#)
    );
    assert!(matches!(
        v.verify(&none, NOW),
        Err(JwtError::WrongAlgorithm(_))
    ));
    assert_eq!(v.verify("abc", NOW), Err(JwtError::Malformed));
}

fn sign_with(alg: &str, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg":alg,"typ":"JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[test]
fn es256_with_a_spki_pem_public_key() {
    let key = rcgen::KeyPair::generate().unwrap();
    let verifier = Verifier::from_pem(&key.public_key_pem()).unwrap();
    assert!(matches!(verifier, Verifier::Es256(_)));
    let rng = ring::rand::SystemRandom::new();
    let signer = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.serialize_der(),
        &rng,
    )
    .unwrap();
    let jwt = sign_with("ES256", &json!({"sub":"u1","exp":NOW + 60}), |m| {
        signer.sign(&rng, m).unwrap().as_ref().to_vec()
    });
    assert_eq!(subject(&verifier.verify(&jwt, NOW).unwrap()).unwrap(), "u1");
    let other = Verifier::from_pem(&rcgen::KeyPair::generate().unwrap().public_key_pem());
    assert_eq!(
        other.unwrap().verify(&jwt, NOW),
        Err(JwtError::BadSignature)
    );
    // An HS256 token never passes an ES256 verifier.
    let hs = sign_hs256(&json!({"alg":"HS256"}), &json!({"sub":"u1"}), b"x");
    assert!(matches!(
        verifier.verify(&hs, NOW),
        Err(JwtError::WrongAlgorithm(_))
    ));
}

#[test]
fn rs256_with_a_spki_pem_public_key() {
    // A throwaway 2048-bit key made for this test (DER: PKCS#8 and SPKI).
    let pkcs8 = include_bytes!("../../../tests/fixtures/jwt-rsa-test-private.pk8");
    let spki_der = include_bytes!("../../../tests/fixtures/jwt-rsa-test-public.der");
    let pem = |label: &str, der: &[u8]| {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
    };
    let signer = signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let verifier = Verifier::from_pem(&pem("PUBLIC KEY", spki_der)).unwrap();
    assert!(matches!(verifier, Verifier::Rs256(_)));
    // The PKCS#1 form names the same key.
    let pkcs1 = pem("RSA PUBLIC KEY", signer.public().as_ref());
    assert!(matches!(
        Verifier::from_pem(&pkcs1).unwrap(),
        Verifier::Rs256(_)
    ));
    let rng = ring::rand::SystemRandom::new();
    let jwt = sign_with("RS256", &json!({"sub":"u2","exp":NOW + 60}), |m| {
        let mut sig = vec![0; signer.public().modulus_len()];
        signer
            .sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
            .unwrap();
        sig
    });
    assert_eq!(subject(&verifier.verify(&jwt, NOW).unwrap()).unwrap(), "u2");
    let mut tampered = jwt.clone();
    tampered.insert(jwt.find('.').unwrap() + 2, 'x');
    assert!(verifier.verify(&tampered, NOW).is_err());
}

#[test]
fn issuer_audience_and_lifetime_rules() {
    let rules = Rules {
        issuer: Some("https://auth.example.com".into()),
        audience: Some("voip-push".into()),
        max_lifetime_secs: Some(86_400),
    };
    let claims = |v: Value| v.as_object().unwrap().clone();
    let good = json!({"sub":"u","iss":"https://auth.example.com","aud":"voip-push",
        "iat":NOW,"exp":NOW + 3600});
    assert_eq!(rules.check(&claims(good.clone()), NOW), Ok(()));
    let mut listed = good.clone();
    listed["aud"] = json!(["other", "voip-push"]);
    assert_eq!(rules.check(&claims(listed), NOW), Ok(()));
    for (field, value, want) in [
        (
            "iss",
            json!("https://evil.example.com"),
            JwtError::WrongIssuer,
        ),
        ("iss", Value::Null, JwtError::WrongIssuer),
        ("aud", json!("other"), JwtError::WrongAudience),
        ("aud", json!(["other"]), JwtError::WrongAudience),
        ("aud", Value::Null, JwtError::WrongAudience),
    ] {
        let mut c = claims(good.clone());
        if value.is_null() {
            c.remove(field);
        } else {
            c.insert(field.into(), value);
        }
        assert_eq!(rules.check(&c, NOW), Err(want), "{field}");
    }
    let long = json!({"iss":"https://auth.example.com","aud":"voip-push",
        "iat":NOW,"exp":NOW + 2 * 86_400});
    assert!(matches!(
        rules.check(&claims(long), NOW),
        Err(JwtError::TooLong(..))
    ));
    // Without iat the lifetime counts from now; an iat in the future too.
    let no_iat = json!({"iss":"https://auth.example.com","aud":"voip-push","exp":NOW + 2 * 86_400});
    assert!(rules.check(&claims(no_iat), NOW).is_err());
    let late_iat = json!({"iss":"https://auth.example.com","aud":"voip-push",
        "iat":NOW + 2 * 86_400,"exp":NOW + 2 * 86_400 + 60});
    assert!(rules.check(&claims(late_iat), NOW).is_err());
    // Issued a day ago and good for one more hour: 25 h in all.
    let old = json!({"iss":"https://auth.example.com","aud":"voip-push",
        "iat":NOW - 86_400,"exp":NOW + 3600});
    assert!(rules.check(&claims(old), NOW).is_err());
    // No rules configured: only what `verify` checks.
    assert_eq!(Rules::default().check(&claims(json!({})), NOW), Ok(()));
}

#[test]
fn garbage_keys_are_refused() {
    assert!(Verifier::from_pem("hello").is_err());
    assert!(
        Verifier::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err()
    );
}
