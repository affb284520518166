use super::*;

fn tls() -> Arc<UpstreamTls> {
    Arc::new(UpstreamTls {
        max_session_keys: 1,
        common: CommonTls {
            certificate: None,
            validation: None,
            alpn: vec![],
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: vec![],
            ecdh_curves: vec![],
        },
        sni: String::new(),
    })
}

#[test]
fn istio_tls_mode_selects_mtls_only_for_labelled_endpoints() {
    let t = ClusterTransport {
        matches: vec![
            TransportMatch {
                name: "tlsMode-istio".into(),
                criteria: [("tlsMode".to_string(), "istio".to_string())].into(),
                tls: Some(tls()),
            },
            TransportMatch {
                name: "tlsMode-disabled".into(),
                criteria: BTreeMap::new(),
                tls: None,
            },
        ],
        default: None,
    };
    let istio = [("tlsMode".to_string(), "istio".to_string())].into();
    assert!(t.for_endpoint(&istio).is_some());
    assert!(t.for_endpoint(&BTreeMap::new()).is_none());
    assert!(t.may_use_tls());
    assert!(!ClusterTransport::default().may_use_tls());
}

// === conversions ===

use envoy_types::pb::google::protobuf::BoolValue;
use prost::Message;

/// A self-signed certificate and its key, PEM.
fn pem_pair() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn inline(text: &str) -> core_v3::DataSource {
    core_v3::DataSource {
        specifier: Some(core_v3::data_source::Specifier::InlineString(text.into())),
        ..Default::default()
    }
}

fn sds_grpc(name: &str) -> tls::SdsSecretConfig {
    use core_v3::grpc_service::{EnvoyGrpc, TargetSpecifier};
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core_v3::ConfigSource {
            config_source_specifier: Some(
                core_v3::config_source::ConfigSourceSpecifier::ApiConfigSource(
                    core_v3::ApiConfigSource {
                        api_type: 2,
                        grpc_services: vec![core_v3::GrpcService {
                            target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                                cluster_name: "sds-grpc".into(),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
    }
}

fn sds_ads(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core_v3::ConfigSource {
            config_source_specifier: Some(core_v3::config_source::ConfigSourceSpecifier::Ads(
                Default::default(),
            )),
            ..Default::default()
        }),
    }
}

fn spiffe(sa: &str) -> tls::SubjectAltNameMatcher {
    tls::SubjectAltNameMatcher {
        san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(format!(
                "spiffe://cluster.local/ns/default/sa/{sa}"
            ))),
            ignore_case: false,
        }),
        oid: String::new(),
    }
}

/// Istio's auto-mTLS upstream context (outbound cluster, `tlsMode-istio` match).
fn istio_upstream() -> tls::UpstreamTlsContext {
    use tls::common_tls_context::{CombinedCertificateValidationContext, ValidationContextType};
    tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_params: Some(tls::TlsParameters {
                tls_minimum_protocol_version: 3,
                tls_maximum_protocol_version: 4,
                ..Default::default()
            }),
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            tls_certificate_sds_secret_configs: vec![sds_grpc("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(tls::CertificateValidationContext {
                        match_typed_subject_alt_names: vec![spiffe("productpage")],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds_grpc("ROOTCA")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        sni: "outbound_.9080_._.productpage.default.svc.cluster.local".into(),
        ..Default::default()
    }
}

#[test]
fn istio_upstream_context_converts_with_sds_and_san_matchers() {
    let t = UpstreamTls::try_from(&istio_upstream()).unwrap();
    assert_eq!(
        t.sni,
        "outbound_.9080_._.productpage.default.svc.cluster.local"
    );
    assert_eq!(t.common.alpn, ["istio-peer-exchange", "istio"]);
    assert_eq!(
        (t.common.min_version, t.common.max_version),
        (TlsVersion::V1_2, TlsVersion::V1_3)
    );
    let grpc = SdsSource::Grpc {
        cluster: "sds-grpc".into(),
    };
    assert_eq!(
        t.common.certificate,
        Some(CertificateSource::Sds(SdsRef {
            name: "default".into(),
            source: grpc.clone()
        }))
    );
    let v = t.common.validation.as_ref().unwrap();
    assert_eq!(v.sds.as_ref().unwrap().name, "ROOTCA");
    assert_eq!(v.inline.san_matchers.len(), 1);
    assert_eq!(v.inline.san_matchers[0].san_type, SanType::Uri);
    let names: Vec<&str> = t.common.sds_refs().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default", "ROOTCA"]);
}

#[test]
fn envoy_version_defaults_differ_for_clients_and_servers() {
    let u = UpstreamTls::try_from(&tls::UpstreamTlsContext::default()).unwrap();
    assert_eq!(u.common.max_version, TlsVersion::V1_2);
    let (cert, key) = pem_pair();
    let d = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificates: vec![tls::TlsCertificate {
                certificate_chain: Some(inline(&cert)),
                private_key: Some(inline(&key)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut no_resumption = d.clone();
    let d = DownstreamTls::try_from(&d).unwrap();
    assert_eq!(d.common.max_version, TlsVersion::V1_3);
    assert!(!d.require_client_certificate);
    assert!(matches!(
        d.common.certificate,
        Some(CertificateSource::Inline(_))
    ));
    // Resumption: Envoy offers tickets and a session cache, and a client keeps one session.
    assert_eq!(d.sessions, ServerSessions::default());
    assert_eq!(u.max_session_keys, 1);
    no_resumption.disable_stateful_session_resumption = true;
    no_resumption.session_ticket_keys_type = Some(
        tls::downstream_tls_context::SessionTicketKeysType::DisableStatelessSessionResumption(true),
    );
    let off = DownstreamTls::try_from(&no_resumption).unwrap();
    assert_eq!(
        off.sessions,
        ServerSessions {
            stateless: false,
            stateful: false
        }
    );
    let u0 = UpstreamTls::try_from(&tls::UpstreamTlsContext {
        max_session_keys: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 0 }),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(u0.max_session_keys, 0);
}

#[test]
fn versions_are_clamped_to_rustls_or_refused_by_name() {
    let with = |min: i32, max: i32| {
        let mut u = istio_upstream();
        u.common_tls_context.as_mut().unwrap().tls_params = Some(tls::TlsParameters {
            tls_minimum_protocol_version: min,
            tls_maximum_protocol_version: max,
            ..Default::default()
        });
        UpstreamTls::try_from(&u)
    };
    // TLSv1_0..TLSv1_3: clamped to 1.2..1.3.
    let t = with(1, 4).unwrap();
    assert_eq!(
        (t.common.min_version, t.common.max_version),
        (TlsVersion::V1_2, TlsVersion::V1_3)
    );
    let t = with(4, 4).unwrap();
    assert_eq!(t.common.min_version, TlsVersion::V1_3);
    // A range with neither 1.2 nor 1.3.
    let e = with(1, 2).unwrap_err();
    assert_eq!(
        e.field,
        "common_tls_context.tls_params.tls_maximum_protocol_version"
    );
    assert!(e.reason.contains("TLSv1_1"), "{}", e.reason);
    let e = with(4, 3).unwrap_err();
    assert!(e.reason.contains("above"), "{}", e.reason);
}

#[test]
fn ciphers_and_curves_are_honoured_only_when_every_name_maps() {
    let with = |ciphers: &[&str], curves: &[&str]| {
        let mut u = istio_upstream();
        u.common_tls_context.as_mut().unwrap().tls_params = Some(tls::TlsParameters {
            cipher_suites: ciphers.iter().map(|s| s.to_string()).collect(),
            ecdh_curves: curves.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        UpstreamTls::try_from(&u)
    };
    let t = with(
        &[
            "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
            "ECDHE-RSA-AES256-GCM-SHA384",
        ],
        &["X25519", "P-256"],
    )
    .unwrap();
    assert_eq!(
        t.common.cipher_suites,
        [
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ]
    );
    assert_eq!(
        t.common.ecdh_curves,
        [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1]
    );
    // Istio's inbound default: the RSA key-exchange suites rustls lacks narrow the allowlist.
    let t = with(
        &[
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "AES256-GCM-SHA384",
            "AES128-GCM-SHA256",
        ],
        &["P-521", "P-256"],
    )
    .unwrap();
    assert_eq!(t.common.cipher_suites.len(), 4);
    assert_eq!(t.common.ecdh_curves, [rustls::NamedGroup::secp256r1]);
    // A name BoringSSL does not know is refused, as Envoy refuses it.
    let e = with(&["ECDHE-RSA-AES128-GCM-SHA256", "NOT-A-CIPHER"], &[]).unwrap_err();
    assert_eq!(e.field, "common_tls_context.tls_params.cipher_suites[1]");
    assert!(e.reason.contains("\"NOT-A-CIPHER\""), "{}", e.reason);
    // A list of which rustls has nothing.
    let e = with(&["AES128-SHA"], &[]).unwrap_err();
    assert_eq!(e.field, "common_tls_context.tls_params.cipher_suites");
    let e = with(&[], &["P-521"]).unwrap_err();
    assert_eq!(e.field, "common_tls_context.tls_params.ecdh_curves");
}

#[test]
fn what_cannot_be_honoured_is_refused_naming_the_field() {
    let refused = |f: &dyn Fn(&mut tls::UpstreamTlsContext)| {
        let mut u = istio_upstream();
        f(&mut u);
        UpstreamTls::try_from(&u).unwrap_err()
    };
    fn common(u: &mut tls::UpstreamTlsContext) -> &mut tls::CommonTlsContext {
        u.common_tls_context.as_mut().unwrap()
    }
    let e = refused(&|u| u.allow_renegotiation = true);
    assert_eq!(e.field, "allow_renegotiation");
    assert!(e.reason.contains("renegotiation"), "{}", e.reason);
    let e = refused(&|u| {
        common(u)
            .tls_certificate_sds_secret_configs
            .push(sds_grpc("second"));
    });
    assert_eq!(
        e.field,
        "common_tls_context.tls_certificate_sds_secret_configs[1]"
    );
    let e = refused(&|u| {
        common(u).tls_certificate_provider_instance = Some(Default::default());
    });
    assert!(
        e.field.ends_with("tls_certificate_provider_instance"),
        "{e:?}"
    );
    // Validation features: pins, CRLs, custom validators.
    let validation = |v: tls::CertificateValidationContext| {
        move |u: &mut tls::UpstreamTlsContext| {
            common(u).validation_context_type =
                Some(tls::common_tls_context::ValidationContextType::ValidationContext(v.clone()));
        }
    };
    let e = refused(&validation(tls::CertificateValidationContext {
        verify_certificate_hash: vec!["ab".into()],
        ..Default::default()
    }));
    assert_eq!(
        e.field,
        "common_tls_context.validation_context.verify_certificate_hash"
    );
    let e = refused(&validation(tls::CertificateValidationContext {
        verify_certificate_spki: vec!["ab".into()],
        ..Default::default()
    }));
    assert!(e.field.ends_with("verify_certificate_spki"));
    let e = refused(&validation(tls::CertificateValidationContext {
        crl: Some(inline("x")),
        ..Default::default()
    }));
    assert!(e.field.ends_with("validation_context.crl"));
    let e = refused(&validation(tls::CertificateValidationContext {
        custom_validator_config: Some(Default::default()),
        ..Default::default()
    }));
    assert!(e.field.ends_with("custom_validator_config"));
    // A private key provider on an inline certificate.
    let e = refused(&|u| {
        common(u).tls_certificate_sds_secret_configs.clear();
        common(u).tls_certificates.push(tls::TlsCertificate {
            private_key_provider: Some(Default::default()),
            ..Default::default()
        });
    });
    assert_eq!(
        e.field,
        "common_tls_context.tls_certificates[0].private_key_provider"
    );
    // SDS from a file.
    let e = refused(&|u| {
        common(u).tls_certificate_sds_secret_configs[0].sds_config = Some(core_v3::ConfigSource {
            config_source_specifier: Some(
                core_v3::config_source::ConfigSourceSpecifier::PathConfigSource(Default::default()),
            ),
            ..Default::default()
        });
    });
    assert!(e.field.contains("sds_config"), "{e:?}");
}

#[test]
fn downstream_context_needs_a_certificate_and_honours_client_auth() {
    use tls::common_tls_context::ValidationContextType;
    let (cert, key) = pem_pair();
    let mut d = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_ads("server")],
            validation_context_type: Some(ValidationContextType::ValidationContext(
                tls::CertificateValidationContext {
                    trusted_ca: Some(inline(&cert)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    let t = DownstreamTls::try_from(&d).unwrap();
    assert!(t.require_client_certificate);
    assert_eq!(t.common.sds_refs().next().unwrap().source, SdsSource::Ads);
    // A trusted CA that is not PEM is refused now, not at the first handshake.
    if let Some(ValidationContextType::ValidationContext(v)) = d
        .common_tls_context
        .as_mut()
        .unwrap()
        .validation_context_type
        .as_mut()
    {
        v.trusted_ca = Some(inline(&key));
    }
    let e = DownstreamTls::try_from(&d).unwrap_err();
    assert_eq!(e.field, "common_tls_context.validation_context.trusted_ca");
    d.common_tls_context
        .as_mut()
        .unwrap()
        .tls_certificate_sds_secret_configs
        .clear();
    d.common_tls_context
        .as_mut()
        .unwrap()
        .validation_context_type = None;
    let e = DownstreamTls::try_from(&d).unwrap_err();
    assert!(e.reason.contains("certificate"), "{e:?}");
    let ocsp = tls::DownstreamTlsContext {
        ocsp_staple_policy: 2,
        ..d
    };
    let e = DownstreamTls::try_from(&ocsp).unwrap_err();
    assert_eq!(e.field, "ocsp_staple_policy");
}

#[test]
fn secrets_convert_and_bad_ones_name_the_field_without_key_material() {
    let (cert, key) = pem_pair();
    let good = tls::Secret {
        name: "default".into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(&cert)),
            private_key: Some(inline(&key)),
            ..Default::default()
        })),
    };
    let s = Secret::try_from(&good).unwrap();
    let SecretKind::Certificate(c) = &s.kind else {
        panic!("{s:?}")
    };
    assert_eq!(c.private_key.inline(), Some(key.as_bytes()));
    let roots = tls::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: Some(core_v3::DataSource {
                    specifier: Some(core_v3::data_source::Specifier::Filename(
                        "/etc/certs/root-cert.pem".into(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    };
    let s = Secret::try_from(&roots).unwrap();
    assert!(matches!(
        s.kind,
        SecretKind::Validation(ValidationContext {
            trusted_ca: Some(DataSource::File(_)),
            ..
        })
    ));
    // The certificate where the key should be: rejected, and the text has no PEM in it.
    let swapped = tls::Secret {
        name: "default".into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(&cert)),
            private_key: Some(inline(&cert)),
            ..Default::default()
        })),
    };
    let e = Secret::try_from(&swapped).unwrap_err();
    assert_eq!(e.kind, "secret");
    assert_eq!(e.field, "tls_certificate.private_key");
    assert!(!e.to_string().contains("BEGIN"), "{e}");
    let generic = tls::Secret {
        name: "g".into(),
        r#type: Some(tls::secret::Type::GenericSecret(Default::default())),
    };
    assert_eq!(
        Secret::try_from(&generic).unwrap_err().field,
        "generic_secret"
    );
    let none = tls::Secret {
        name: "n".into(),
        r#type: None,
    };
    assert_eq!(Secret::try_from(&none).unwrap_err().field, "type");
}

#[test]
fn transport_sockets_are_plaintext_tls_or_refused() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
    let socket = |type_name: &str, value: Vec<u8>| core_v3::TransportSocket {
        name: "s".into(),
        config_type: Some(core_v3::transport_socket::ConfigType::TypedConfig(Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value,
        })),
    };
    let raw = socket(super::super::compat::RAW_BUFFER_TYPE, vec![]);
    assert_eq!(upstream_socket(&raw).unwrap(), None);
    let mtls = socket(UPSTREAM_TLS_TYPE, istio_upstream().encode_to_vec());
    assert!(upstream_socket(&mtls).unwrap().is_some());
    // A downstream context where an upstream one is expected.
    let e = upstream_socket(&socket(DOWNSTREAM_TLS_TYPE, vec![])).unwrap_err();
    assert_eq!(e.field, "typed_config");
    let e = upstream_socket(&socket(
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        vec![],
    ))
    .unwrap_err();
    assert!(e.reason.contains("InternalUpstreamTransport"), "{e:?}");
    // Istio's outbound cluster: tlsMode-istio -> mTLS, tlsMode-disabled -> raw buffer.
    let criteria = envoy_types::pb::google::protobuf::Struct {
        fields: [(
            "tlsMode".to_string(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                    "istio".into(),
                )),
            },
        )]
        .into(),
    };
    let t = cluster_transport(
        None,
        &[
            TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(criteria),
                transport_socket: Some(mtls),
            },
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(Default::default()),
                transport_socket: Some(raw),
            },
        ],
    )
    .unwrap();
    assert!(t.may_use_tls());
    let istio: BTreeMap<String, String> = [("tlsMode".to_string(), "istio".to_string())].into();
    assert!(t.for_endpoint(&istio).is_some());
    assert!(t.for_endpoint(&BTreeMap::new()).is_none());
    assert_eq!(t.sds_refs().count(), 2);
}

#[test]
fn secrets_go_back_to_the_wire_unchanged() {
    let (cert, _) = pem_pair();
    let mut v = tls::CertificateValidationContext {
        trusted_ca: Some(inline(&cert)),
        match_typed_subject_alt_names: vec![spiffe("a")],
        ..Default::default()
    };
    #[allow(deprecated)]
    v.match_subject_alt_names.push(matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(
            matcher::RegexMatcher {
                regex: "spiffe://.*/sa/(a|b)".into(),
                ..Default::default()
            },
        )),
        ignore_case: false,
    });
    let wire = tls::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls::secret::Type::ValidationContext(v)),
    };
    let model = Secret::try_from(&wire).unwrap();
    let back = tls::Secret::from(&model);
    assert_eq!(Secret::try_from(&back).unwrap(), model);
}

mod hostile {
    use super::*;
    use proptest::prelude::{any, proptest};

    proptest! {
        /// Whatever bytes arrive, decoding and conversion answer with a value or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(c) = tls::UpstreamTlsContext::decode(bytes.as_slice()) {
                let _ = UpstreamTls::try_from(&c);
            }
            if let Ok(c) = tls::DownstreamTlsContext::decode(bytes.as_slice()) {
                let _ = DownstreamTls::try_from(&c);
            }
            if let Ok(s) = tls::Secret::decode(bytes.as_slice()) {
                let _ = Secret::try_from(&s);
            }
        }
    }
}
