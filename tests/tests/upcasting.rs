//! Versions and upcasting: an event at version 3 that declares its versions 1 and 2
//! (`upcast(1 = EntryPostedV1, 2 = EntryPostedV2)`), on every backend.
//!
//! - rows written at v1 and v2 (and v3) sit in the table, the relay sends them to the
//!   topic (the records carry the row's version), and only then does a consumer start:
//!   the v3 handler receives each as a v3 value, converted step by step (v1 → v2 → v3),
//!   and every row ends `consumed`; a forged record naming the v1 row as v3 changes
//!   nothing (the row's version decides);
//! - the generated decoder itself: each version, a version it does not know, a bad
//!   payload (redacted);
//! - the catalog exports the versions and rejects a broken chain registered by hand.
//!
//! Waiting is polling against a deadline, never a sleep used as synchronisation.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use outbox_runtime::__private::{no_schema, EventRegistration, OlderVersion, ServiceRegistration};
use outbox_runtime::envelope::Envelope;
use outbox_runtime::schemars::JsonSchema;
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, Catalog, Event, HandlerContext,
    HandlerError, KafkaConfig, Outbox, OutboxRuntime, RawEvent, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{eventually, fresh_catalog, test_config};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Ledger;

/// Version 1: an amount in cents, always euros.
#[derive(Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "outbox_runtime::schemars")]
pub struct EntryPostedV1 {
    pub entry: String,
    pub cents: i64,
}

/// Version 2: the currency became explicit. No `JsonSchema`: its schema is unknown.
#[derive(Serialize, Deserialize)]
pub struct EntryPostedV2 {
    pub entry: String,
    pub cents: i64,
    pub currency: String,
    /// The versions this value was converted from (test trace).
    #[serde(default)]
    pub via: Vec<u32>,
}

/// Version 3, the current one: the amount is a structure.
#[outbox_event(service = Ledger, name = "entry.posted", version = 3, key = entry,
    upcast(1 = EntryPostedV1, 2 = EntryPostedV2))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "outbox_runtime::schemars")]
pub struct EntryPosted {
    pub entry: String,
    pub amount: Amount,
    /// The versions this value was converted from (test trace).
    #[serde(default)]
    pub via: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "outbox_runtime::schemars")]
pub struct Amount {
    pub cents: i64,
    pub currency: String,
}

impl From<EntryPostedV1> for EntryPostedV2 {
    fn from(v1: EntryPostedV1) -> Self {
        EntryPostedV2 {
            entry: v1.entry,
            cents: v1.cents,
            currency: "EUR".into(),
            via: vec![1],
        }
    }
}

impl From<EntryPostedV2> for EntryPosted {
    fn from(v2: EntryPostedV2) -> Self {
        let mut via = v2.via;
        via.push(2);
        EntryPosted {
            entry: v2.entry,
            amount: Amount {
                cents: v2.cents,
                currency: v2.currency,
            },
            via,
        }
    }
}

/// What the handler saw: the row's version and the v3 value.
static SEEN: Mutex<Vec<(u32, EntryPosted)>> = Mutex::new(Vec::new());

#[outbox_handler]
async fn on_entry_posted<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: EntryPosted,
) -> Result<(), HandlerError> {
    let version = ctx.meta().version;
    SEEN.lock().unwrap().push((version, event));
    Ok(())
}

fn seen_with_prefix(prefix: &str) -> Vec<(u32, EntryPosted)> {
    let mut seen: Vec<_> = SEEN
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e.entry.starts_with(prefix))
        .cloned()
        .collect();
    seen.sort_by(|a, b| a.1.entry.cmp(&b.1.entry));
    seen
}

fn raw(version: u32, payload: String) -> RawEvent {
    RawEvent {
        event_type: "entry.posted".into(),
        version,
        key: None,
        payload,
        max_retries: None,
    }
}

/// Rows of v1, v2 and v3 in the table, then as records in the topic (relay only),
/// then a consumer: the handler gets v3 values, each converted along the chain.
async fn older_rows_and_records_reach_the_v3_handler<T: TestDatabase>() {
    let db = T::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = fresh_catalog(&broker).await;
    outbox_runtime::migrate(&pool, &catalog, ["ledger"])
        .await
        .expect("migrate");
    let config = test_config();
    let prefix = format!("{}-", T::LABEL);
    let entry = |n: &str| format!("{prefix}{n}");

    // The rows, as an older deployment wrote them, plus one of today's.
    let outbox = Outbox::<Ledger, T::DB>::with_config(pool.clone(), &catalog, config.clone())
        .expect("outbox");
    let mut tx = outbox.begin().await.unwrap();
    let v1 = format!(r#"{{"entry":"{}","cents":150}}"#, entry("a-v1"));
    let v2 = format!(
        r#"{{"entry":"{}","cents":275,"currency":"USD"}}"#,
        entry("b-v2")
    );
    let ids = [
        tx.publish_raw(&raw(1, v1)).await.expect("v1 row"),
        tx.publish_raw(&raw(2, v2)).await.expect("v2 row"),
        tx.publish(&EntryPosted {
            entry: entry("c-v3"),
            amount: Amount {
                cents: 990,
                currency: "CHF".into(),
            },
            via: vec![],
        })
        .await
        .expect("v3 row"),
    ];
    tx.commit().await.unwrap();

    // Runs the ledger's relays or its consumer alone until every row has `wanted` (and
    // the consumer has turned away `forged` records).
    let run_until = |relays: bool, wanted: Status, forged: u64| {
        let (pool, catalog, config) = (pool.clone(), catalog.clone(), config.clone());
        let brokers = broker.bootstrap_servers();
        async move {
            let runtime = OutboxRuntime::new(catalog, pool.clone(), KafkaConfig::new(brokers))
                .config(config)
                .services(["ledger"])
                .relays(relays)
                .consumers(!relays)
                .start()
                .await
                .expect("runtime");
            let table = "ledger_outbox".parse().unwrap();
            eventually(
                &format!("every row {wanted:?}"),
                Duration::from_secs(60),
                || async {
                    for id in ids {
                        let row = T::DB::fetch(&pool, &table, id.0).await.expect("fetch")?;
                        if row.status != wanted {
                            return None;
                        }
                    }
                    let turned_away = runtime.consumer_stats("ledger").map_or(0, |s| {
                        s.mismatched.load(Ordering::Relaxed) + s.duplicates.load(Ordering::Relaxed)
                    });
                    (turned_away >= forged).then_some(())
                },
            )
            .await;
            runtime.shutdown().await.expect("shutdown");
        }
    };

    // The relay alone: the rows become records in the topic, at their own versions.
    run_until(true, Status::Published, 0).await;
    assert!(seen_with_prefix(&prefix).is_empty(), "no consumer ran yet");

    // A forged record for the v1 row, claiming v3 with a v3 payload: the row is the
    // truth, so it changes nothing; the row is handled from its own v1 payload.
    let v1_row = T::DB::fetch(&pool, &"ledger_outbox".parse().unwrap(), ids[0].0)
        .await
        .expect("fetch")
        .expect("the v1 row");
    let forged = Envelope {
        event_id: ids[0],
        service: "ledger".into(),
        event_type: "entry.posted".into(),
        version: 3,
        key: None,
        time: v1_row.created_at,
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    };
    let payload = format!(
        r#"{{"entry":"{}","amount":{{"cents":1,"currency":"FORGED"}}}}"#,
        entry("a-v1")
    );
    let producer: FutureProducer = broker.client_config().create().expect("producer");
    let topic = catalog.route("ledger").unwrap().topic().to_string();
    producer
        .send(
            FutureRecord::<(), _>::to(&topic)
                .payload(&payload)
                .headers(forged.headers()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("producing the forged record");

    // The consumer: each record names its row, whose version decides the decoding.
    run_until(false, Status::Consumed, 1).await;

    let seen = seen_with_prefix(&prefix);
    let amount = |cents, currency: &str| Amount {
        cents,
        currency: currency.into(),
    };
    assert_eq!(
        seen,
        vec![
            (
                1,
                EntryPosted {
                    entry: entry("a-v1"),
                    amount: amount(150, "EUR"),
                    via: vec![1, 2],
                }
            ),
            (
                2,
                EntryPosted {
                    entry: entry("b-v2"),
                    amount: amount(275, "USD"),
                    via: vec![2],
                }
            ),
            (
                3,
                EntryPosted {
                    entry: entry("c-v3"),
                    amount: amount(990, "CHF"),
                    via: vec![],
                }
            ),
        ],
        "each row handled once, as v3, converted from its own version"
    );
    db.cleanup().await;
}

outbox_tests::every_backend!(older_rows_and_records_reach_the_v3_handler);

#[test]
fn the_generated_decoder_upcasts_each_version_and_names_the_ones_it_knows() {
    let v1 = EntryPosted::decode(1, br#"{"entry":"e","cents":5}"#).expect("v1");
    assert_eq!(
        (v1.amount.cents, v1.amount.currency.as_str(), v1.via),
        (5, "EUR", vec![1, 2])
    );
    let v3 = EntryPosted::decode(3, br#"{"entry":"e","amount":{"cents":7,"currency":"GBP"}}"#)
        .expect("v3");
    assert_eq!(v3.amount.currency, "GBP");

    // A v3 payload in a row that says v1 is read as v1: the row's version decides.
    let wrong = EntryPosted::decode(1, br#"{"entry":"e","amount":{"cents":7}}"#).unwrap_err();
    assert_eq!(
        wrong.message(),
        "undecodable payload for event type `entry.posted` v1: data error at line 1 column \
         34: missing field `cents`"
    );

    for version in [0, 4] {
        let err = EntryPosted::decode(version, b"{}").unwrap_err();
        assert!(
            err.message().starts_with(&format!(
                "event type `entry.posted` has no decoder for schema version {version}"
            )) && err.message().ends_with("it decodes versions 1, 2, 3"),
            "{err}"
        );
    }

    // Values from the payload never reach the message.
    let err = EntryPosted::decode(2, br#"{"entry":"e","cents":"SECRET-IBAN","currency":"X"}"#)
        .unwrap_err();
    assert!(!err.message().contains("SECRET"), "{err}");
}

#[test]
fn the_catalog_exports_every_version_oldest_first() {
    let catalog = Catalog::global().expect("valid catalog");
    let info = catalog.event_of::<EntryPosted>().expect("registered");
    let versions: Vec<(u32, &str)> = info
        .versions
        .iter()
        .map(|v| (v.version, v.rust_type.as_str()))
        .collect();
    assert_eq!(
        versions,
        [
            (1, "upcasting::EntryPostedV1"),
            (2, "upcasting::EntryPostedV2"),
            (3, "upcasting::EntryPosted"),
        ]
    );
    let json = catalog.to_json();
    let exported = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "entry.posted")
        .expect("exported");
    let numbers: Vec<u64> = exported["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);

    // Schemas of the types that derive `JsonSchema` (v1, v3), none for v2.
    let schema = |i: usize| &exported["versions"][i]["schema"];
    assert_eq!(schema(0)["properties"]["cents"]["type"], "integer");
    assert!(schema(1).is_null(), "{}", schema(1));
    assert_eq!(
        schema(2)["properties"]["amount"]["$ref"],
        "#/$defs/Amount",
        "{}",
        schema(2)
    );
}

fn older(version: u32) -> OlderVersion {
    OlderVersion {
        version,
        rust_type: "hand::Older",
        schema: no_schema,
    }
}

#[test]
fn a_broken_chain_registered_by_hand_fails_the_catalog_with_every_problem() {
    let services: Vec<ServiceRegistration> =
        outbox_runtime::__private::inventory::iter::<ServiceRegistration>
            .into_iter()
            .filter(|s| s.name == "ledger")
            .copied()
            .collect();
    let event =
        |name: &'static str, version: u32, older: &'static [OlderVersion]| EventRegistration {
            event_type: name,
            version,
            service: "ledger",
            service_table: "ledger_outbox",
            max_retries: None,
            key_field: None,
            rust_type: "hand::Event",
            older_versions: older,
            schema: no_schema,
            public: false,
        };
    static GAP: [OlderVersion; 2] = [
        OlderVersion {
            version: 1,
            rust_type: "hand::V1",
            schema: no_schema,
        },
        OlderVersion {
            version: 3,
            rust_type: "hand::V3",
            schema: no_schema,
        },
    ];
    let twice: &'static [OlderVersion] = Box::leak(Box::new([older(1), older(1)]));
    let too_new: &'static [OlderVersion] = Box::leak(Box::new([older(2)]));
    let fine: &'static [OlderVersion] = Box::leak(Box::new([older(2)]));
    let events = [
        event("gap", 4, &GAP),
        event("twice", 2, twice),
        event("too.new", 2, too_new),
        event("fine", 3, fine),
    ];
    let err = Catalog::builder()
        .build_from(&services, &events, &[])
        .expect_err("broken chains");
    assert_eq!(
        err.problems,
        [
            "event type `gap` (`hand::Event`): the upcast chain from version 1 to 4 has a \
             gap: no type for version(s) 2",
            "event type `too.new` (`hand::Event`): older version 2 (`hand::Older`) is not \
             below the current version 2",
            "event type `twice` (`hand::Event`): older version 1 is declared twice",
        ],
        "{err}"
    );
}
