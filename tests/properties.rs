//! Property tests with real processes, each case on one of the store backends (SQLite,
//! PostgreSQL, MariaDB: the backend is part of the generated input):
//! - for any sequence of deploys and stops, live deployments never share an endpoint URL or port;
//! - for any running deployment, whatever its process tree does on SIGTERM, stop leaves the
//!   record STOPPED with `stopped_at` in the database and no process of the tree alive;
//! - for any set of tools and replicas and any sequence of requests, every request through
//!   `/mcp/{slug}` reaches a deployment of the tool its slug names.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{AppOptions, Backend, TestApp, alive, port_range, read_pids, whoami};
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
enum Op {
    Deploy(usize),
    Stop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3).prop_map(Op::Deploy),
        1 => (0usize..16).prop_map(Op::Stop),
    ]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn live_endpoints_are_always_unique(ops in proptest::collection::vec(op(), 1..10), backend in 0usize..3) {
        rt().block_on(async {
            let database_url = Backend::ALL[backend].fresh_url().await;
            let app = TestApp::with(AppOptions { ports: port_range(12), database_url, ..Default::default() }).await;
            for slug in ["t0", "t1", "t2"] {
                app.add_test_tool(slug, &[], json!({})).await;
            }
            let mut live: Vec<String> = Vec::new();
            for op in ops {
                match op {
                    Op::Deploy(t) => {
                        let (st, d) = app.call("POST", &format!("/api/v1/tools/t{t}/deployments"), None).await;
                        assert_eq!(st.as_u16(), 201, "{d}");
                        live.push(d["id"].as_str().unwrap().to_owned());
                    }
                    Op::Stop(k) if !live.is_empty() => {
                        let id = live.remove(k % live.len());
                        let d = app.stop_deployment(&id).await;
                        assert_eq!(d["status"], "STOPPED");
                    }
                    Op::Stop(_) => {}
                }
                let (_, ds) = app.call("GET", "/api/v1/deployments?status=STARTING,RUNNING", None).await;
                let ds = ds.as_array().unwrap();
                assert_eq!(ds.len(), live.len(), "{ds:?}");
                let urls: HashSet<&str> = ds.iter().map(|d| d["endpoint_url"].as_str().unwrap()).collect();
                let ports: HashSet<u64> = ds.iter().map(|d| d["port"].as_u64().unwrap()).collect();
                assert_eq!(urls.len(), ds.len(), "duplicate endpoint URL among {ds:?}");
                assert_eq!(ports.len(), ds.len(), "duplicate port among {ds:?}");
            }
            app.stop().await;
        });
    }

    #[test]
    fn stop_leaves_stopped_and_no_process_alive(
        ignore_sigterm in any::<bool>(),
        grandchild in any::<bool>(),
        setsid_grandchild in any::<bool>(),
        wait_running in any::<bool>(),
        backend in 0usize..3,
    ) {
        rt().block_on(async {
            let database_url = Backend::ALL[backend].fresh_url().await;
            let app = TestApp::with(AppOptions { database_url: database_url.clone(), ..Default::default() }).await;
            let pids_file = app.data_dir.path().join("pids");
            let mut args = vec!["--pid-file", pids_file.to_str().unwrap()];
            if ignore_sigterm { args.push("--ignore-sigterm"); }
            if grandchild { args.push("--grandchild"); }
            if setsid_grandchild { args.push("--setsid-grandchild"); }
            app.add_test_tool("victim", &args, json!({"stop_grace_period_ms": 300})).await;
            let d: Value = if wait_running {
                app.deploy_wait("victim").await
            } else {
                let (_, d) = app.call("POST", "/api/v1/tools/victim/deployments", None).await;
                d
            };
            let id = d["id"].as_str().unwrap().to_owned();
            // Make sure every process the variant spawns exists before stopping.
            let want = 1 + usize::from(grandchild) + usize::from(setsid_grandchild);
            common::eventually(std::time::Duration::from_secs(10), || {
                let f = pids_file.clone();
                async move { read_pids(&f).len() == want }
            }).await;

            let stopped = app.stop_deployment(&id).await;
            assert_eq!(stopped["status"], "STOPPED", "{stopped}");

            let (status, stopped_at_set) = common::record_in_db(database_url.as_deref(), &app.db_path(), &id).await;
            assert_eq!(status, "STOPPED");
            assert!(stopped_at_set);
            for pid in read_pids(&pids_file) {
                assert!(!alive(pid), "pid {pid} survived stop (variant: sigterm-ignored={ignore_sigterm} grandchild={grandchild} setsid={setsid_grandchild})");
            }
            app.stop().await;
        });
    }

    #[test]
    fn every_request_reaches_the_tool_its_slug_names(
        replicas in proptest::collection::vec(1usize..=2, 1..=3),
        requests in proptest::collection::vec(0usize..3, 1..16),
        backend in 0usize..3,
    ) {
        rt().block_on(async {
            let database_url = Backend::ALL[backend].fresh_url().await;
            let app = TestApp::with(AppOptions { ports: port_range(8), database_url, ..Default::default() }).await;
            let mut owned: Vec<(String, HashSet<String>)> = Vec::new();
            for (i, n) in replicas.iter().enumerate() {
                let slug = format!("tool-{i}");
                app.add_test_tool(&slug, &[], json!({})).await;
                let mut ids = HashSet::new();
                for _ in 0..*n {
                    ids.insert(app.deploy_wait(&slug).await["id"].as_str().unwrap().to_owned());
                }
                owned.push((slug, ids));
            }
            for r in requests {
                let (slug, ids) = &owned[r % owned.len()];
                let who = whoami(&format!("{}/mcp/{slug}", app.url)).await;
                assert_eq!(who["tool"], slug.as_str(), "{who}");
                let dep = who["deployment"].as_str().unwrap();
                assert!(ids.contains(dep), "request for {slug} reached {dep}, not one of {ids:?}");
            }
            app.stop().await;
        });
    }
}
