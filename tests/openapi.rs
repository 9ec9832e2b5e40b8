//! The OpenAPI document tells the truth: schemathesis (tests/python/requirements.txt) sends
//! generated and malformed requests to every operation that does not start processes, and
//! fails on any status or body the document does not describe.

mod common;

use common::{AppOptions, TestApp, python};

#[tokio::test]
async fn every_status_and_body_the_api_answers_is_documented() {
    let app = TestApp::with(AppOptions {
        token: Some("schemathesis-token".into()),
        ..Default::default()
    })
    .await;
    let schemathesis = python().with_file_name("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: `tests/python/.venv/bin/pip install -r tests/python/requirements.txt` \
         (scripts/test does this)",
        schemathesis.display()
    );
    // Hypothesis keeps its example database in the working directory.
    let scratch = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(&schemathesis)
        .current_dir(scratch.path())
        .args([
            "run",
            &format!("{}/api/v1/openapi.json", app.url),
            "--header",
            "Authorization: Bearer schemathesis-token",
            "--checks",
            "status_code_conformance,response_schema_conformance",
            // Operations that start processes (deploy, scale) and the endless event stream.
            "--exclude-operation-id",
            "deploy",
            "--exclude-operation-id",
            "scale_tool",
            "--exclude-operation-id",
            "events",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "30",
            "--workers",
            "1",
            "--no-color",
        ])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found undocumented responses:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("passed"),
        "schemathesis ran no test case:\n{report}"
    );
    app.stop().await;
}
