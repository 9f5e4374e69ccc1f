//! `flexmodel serve` on loopback: a forward request with captures and edits answers what
//! `flexmodel capture` writes, asked through the Rust client, curl and Python's
//! `requests`; a missing or wrong token, bad JSON, an unknown hook and an unknown path
//! are refused (401, 400, 404) saying what is wrong, and the server goes on serving.

mod common;

use std::process::Command;

use candle_core::{Device, Tensor};
use common::cli::{succeeded, tensors, tiny_dir};
use common::etcd::TokenFile;
use common::serve::Server;
use flexmodel::api::ForwardRequest;
use flexmodel::client::{Client, ClientError};

/// What Python (with `requests` and `safetensors`) prints running `script`.
fn python(script: &str) -> String {
    let out = Command::new(common::transformer_lens_python())
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bytes_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_served_forward_pass_is_what_capture_writes_for_every_client() {
    let model = tiny_dir(11);
    let tokens = TokenFile::new("alice-secret\nbob-secret\n");
    let dir = tempfile::tempdir().unwrap();
    // A vector to add, sent inline by the client and from a file to `capture`.
    let delta = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap();
    let delta = (delta * 0.01).unwrap();
    let delta_file = dir.path().join("delta.safetensors");
    delta
        .save_safetensors("blocks.1.hook_resid_pre", &delta_file)
        .unwrap();
    let edits = [
        "blocks.0.attn.hook_z=zero-head:3",
        "blocks.2.hook_mlp_out=scale:0.5",
    ];
    let out = dir.path().join("capture.safetensors");
    let add = format!("blocks.1.hook_resid_pre=add:{}", delta_file.display());
    for layout in [&[][..], &["--tp", "2"][..]] {
        let mut args = vec![
            "capture",
            "--model",
            model.path().to_str().unwrap(),
            "--tokens-file",
        ];
        let rows = dir.path().join("rows.txt");
        std::fs::write(&rows, "5 17 200 3 99\n1 2 3\n").unwrap();
        args.push(rows.to_str().unwrap());
        for hook in ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"] {
            args.extend(["--hook", hook]);
        }
        for edit in edits {
            args.extend(["--edit", edit]);
        }
        args.extend(["--edit", &add, "--out", out.to_str().unwrap()]);
        args.extend(layout);
        succeeded(&args);
        let expected = tensors(&out);

        let server = Server::start(model.path(), &tokens.path, layout);
        let request = ForwardRequest::tokens([vec![5, 17, 200, 3, 99], vec![1, 2, 3]])
            .hook("blocks.*.hook_resid_post")
            .hook("blocks.0.attn.hook_pattern")
            .edit(edits[0])
            .edit(edits[1])
            .add("blocks.1.hook_resid_pre", &delta)
            .unwrap();
        for token in ["alice-secret", "bob-secret"] {
            let answer = Client::new(&server.url, token)
                .unwrap()
                .forward(&request)
                .unwrap();
            let mut answer: Vec<(String, Vec<f32>)> = answer
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        bytes_of(&t.to_dtype(candle_core::DType::F32).unwrap()),
                    )
                })
                .collect();
            answer.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(answer, expected, "{layout:?}: served as captured");
        }
        let health = Client::new(&server.url, "bob-secret")
            .unwrap()
            .health()
            .unwrap();
        assert_eq!(health.model, model.path().to_str().unwrap());
        assert_eq!(health.ranks_alive, if layout.is_empty() { 1 } else { 2 });
        assert_eq!(health.queue, 0);
    }
}

#[test]
fn curl_and_python_get_the_same_answer_and_bad_requests_are_refused_saying_why() {
    let model = tiny_dir(12);
    let tokens = TokenFile::new("carol-secret\n");
    let server = Server::start(model.path(), &tokens.path, &[]);
    let dir = tempfile::tempdir().unwrap();
    let body = r#"{"tokens": [[5, 6, 7, 8]], "hooks": ["blocks.3.hook_resid_post"],
        "edits": ["blocks.1.hook_mlp_out=scale:2"]}"#;
    let curl_out = dir.path().join("curl.safetensors");
    let curl = Command::new("curl")
        .args(["-sS", "--fail-with-body", "-o", curl_out.to_str().unwrap()])
        .args(["-H", "Authorization: Bearer carol-secret"])
        .args(["-H", "Content-Type: application/json", "--data", body])
        .arg(format!("{}/v1/forward", server.url))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stdout)
    );
    let from_curl = tensors(&curl_out);
    let python_out = dir.path().join("python.safetensors");
    let script = format!(
        r#"
import json, sys, requests
from safetensors.numpy import load, save_file
answer = requests.post("{url}/v1/forward", headers={{"Authorization": "Bearer carol-secret"}},
                       json=json.loads('''{body}'''))
answer.raise_for_status()
save_file(load(answer.content), "{out}")
"#,
        url = server.url,
        out = python_out.display()
    );
    python(&script);
    assert_eq!(tensors(&python_out), from_curl);
    assert!(
        from_curl
            .iter()
            .any(|(k, _)| k == "blocks.3.hook_resid_post")
    );

    let refused = |token: Option<&str>, method: &str, path: &str, body: &str| {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(token) = token {
            curl.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let out = curl
            .args(["--data", body])
            .arg(format!("{}{path}", server.url))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (json, code) = text.rsplit_once('\n').unwrap();
        let error: serde_json::Value = serde_json::from_str(json).unwrap();
        (
            code.to_string(),
            error["error"].as_str().unwrap().to_string(),
        )
    };
    let (code, error) = refused(None, "POST", "/v1/forward", body);
    assert_eq!(code, "401");
    assert!(error.contains("Authorization: Bearer"), "{error}");
    let (code, _) = refused(Some("mallory"), "POST", "/v1/forward", body);
    assert_eq!(code, "401");
    let (code, error) = refused(Some("carol-secret"), "POST", "/v1/forward", "{not json");
    assert_eq!(code, "400");
    assert!(error.contains("JSON"), "{error}");
    let unknown = r#"{"tokens": [[1, 2]], "hooks": ["blocks.0.hook_resid_psot"]}"#;
    let (code, error) = refused(Some("carol-secret"), "POST", "/v1/forward", unknown);
    assert_eq!(code, "400");
    assert!(
        error.contains("blocks.0.hook_resid_pre"),
        "suggests the nearest: {error}"
    );
    let outside = r#"{"tokens": [[1, 99999]]}"#;
    let (code, error) = refused(Some("carol-secret"), "POST", "/v1/forward", outside);
    assert_eq!(code, "400");
    assert!(error.contains("99999"), "{error}");
    let (code, error) = refused(Some("carol-secret"), "GET", "/v2/nothing", "");
    assert_eq!(code, "404");
    assert!(error.contains("/v2/nothing"), "{error}");

    // The server still serves, and tells its hooks and its OpenAPI document.
    let client = Client::new(&server.url, "carol-secret").unwrap();
    let hooks = client.hooks().unwrap();
    assert!(
        hooks
            .lines()
            .any(|l| l.starts_with("blocks.3.attn.hook_pattern"))
    );
    let request = ForwardRequest::tokens([vec![5, 6, 7, 8]]).hook("blocks.3.hook_resid_post");
    assert!(client.forward(&request).is_ok());
    let missing = Client::new(&server.url, "carol-secret")
        .unwrap()
        .forward(&ForwardRequest::default());
    assert!(matches!(
        missing,
        Err(ClientError::Server { status: 400, .. })
    ));
    let openapi = Command::new("curl")
        .args(["-sS", &format!("{}/openapi.json", server.url)])
        .output()
        .unwrap();
    let openapi: serde_json::Value = serde_json::from_slice(&openapi.stdout).unwrap();
    assert!(openapi["paths"]["/v1/forward"]["post"].is_object());
}

#[test]
fn persistent_edits_apply_only_to_the_requests_that_opt_in() {
    let model = tiny_dir(13);
    let tokens = TokenFile::new("dave-secret\n");
    let server = Server::start(model.path(), &tokens.path, &["--tp", "2"]);
    let client = Client::new(&server.url, "dave-secret").unwrap();
    let rows = || [vec![9, 8, 7, 6, 5]];
    let plain = ForwardRequest::tokens(rows()).hook("blocks.3.hook_resid_post");
    let inline = plain.clone().edit("blocks.2.hook_mlp_out=scale:0.5");
    let opted = ForwardRequest {
        use_edits: vec!["half-mlp".into()],
        ..plain.clone()
    };
    let http = curl_with(&server.url, "dave-secret");
    let installed = http(
        "POST",
        "/v1/edits",
        r#"{"name": "half-mlp", "edits": ["blocks.2.hook_mlp_out=scale:0.5"]}"#,
    );
    assert_eq!(installed.0, "201", "{}", installed.1);
    let refused = http(
        "POST",
        "/v1/edits",
        r#"{"name": "x", "edits": ["blocks.9.hook_z=scale:2"]}"#,
    );
    assert_eq!(refused.0, "400", "{}", refused.1);
    let listed = http("GET", "/v1/edits", "");
    assert!(
        listed.1.contains("half-mlp") && listed.1.contains("scale:0.5"),
        "{}",
        listed.1
    );

    let resid = |request: &ForwardRequest| {
        bytes_of(&client.forward(request).unwrap()["blocks.3.hook_resid_post"])
    };
    let (plain_resid, inline_resid, opted_resid) = (resid(&plain), resid(&inline), resid(&opted));
    assert_eq!(
        opted_resid, inline_resid,
        "the persistent edit applies to who opts in"
    );
    assert_ne!(plain_resid, inline_resid);
    assert_eq!(resid(&plain), plain_resid, "and to no one else");

    assert_eq!(http("DELETE", "/v1/edits/half-mlp", "").0, "204");
    assert_eq!(http("DELETE", "/v1/edits/half-mlp", "").0, "404");
    let gone = client.forward(&opted).unwrap_err().to_string();
    assert!(
        gone.contains("no persistent edit is named \"half-mlp\""),
        "{gone}"
    );
}

/// `(status, body)` of `METHOD PATH` with `body`, through curl with `token`.
fn curl_with(url: &str, token: &str) -> impl Fn(&str, &str, &str) -> (String, String) {
    let (url, token) = (url.to_string(), token.to_string());
    move |method, path, body| {
        let out = Command::new("curl")
            .args(["-sS", "-X", method, "-w", "\n%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Content-Type: application/json"])
            .args(if body.is_empty() {
                vec![]
            } else {
                vec!["--data", body]
            })
            .arg(format!("{url}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_string(), body.to_string())
    }
}

/// Sorted `(name, values)` of an answer.
fn sorted(answer: &std::collections::HashMap<String, Tensor>) -> Vec<(String, Vec<f32>)> {
    let mut named: Vec<(String, Vec<f32>)> = answer
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                bytes_of(&t.to_dtype(candle_core::DType::F32).unwrap()),
            )
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Requests of different lengths, hooks and edits (one a persistent edit), for the
/// batching tests.
fn varied_requests() -> Vec<ForwardRequest> {
    let delta = (Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap() * 0.01).unwrap();
    vec![
        ForwardRequest::tokens([vec![5, 17, 200, 3, 99], vec![1, 2, 3]])
            .hook("blocks.*.hook_resid_post")
            .hook("blocks.0.attn.hook_pattern")
            .edit("blocks.0.attn.hook_z=zero-head:3")
            .add("blocks.1.hook_resid_pre", &delta)
            .unwrap(),
        ForwardRequest::tokens([vec![7, 8]])
            .hook("blocks.1.hook_resid_post")
            .edit("blocks.0.hook_mlp_out=scale:0.5"),
        ForwardRequest::tokens([vec![9, 10, 11, 12, 13, 14, 15, 16]])
            .hook("blocks.0.attn.hook_pattern")
            .hook("blocks.3.hook_resid_post"),
        ForwardRequest::tokens([vec![40, 41, 42], vec![43, 44, 45]])
            .hook("blocks.*.hook_resid_post")
            .use_edits("half-mlp"),
        ForwardRequest::tokens([vec![50]]).hook("blocks.*.hook_resid_post"),
        ForwardRequest::tokens([(60..77).collect(), (80..91).collect()])
            .hook("blocks.*.attn.hook_pattern")
            .hook("blocks.3.hook_resid_post")
            .edit("blocks.1.attn.hook_z=zero-head:0"),
    ]
}

#[test]
fn concurrent_requests_with_different_edits_share_a_pass_and_each_gets_its_own_answer() {
    let model = tiny_dir(14);
    let tokens = TokenFile::new("erin-secret\n");
    for layout in [&[][..], &["--tp", "2", "--pp", "2"][..]] {
        let mut options = vec!["--batch-window-ms", "1500"];
        options.extend(layout);
        let server = Server::start(model.path(), &tokens.path, &options);
        let client = Client::new(&server.url, "erin-secret").unwrap();
        let http = curl_with(&server.url, "erin-secret");
        let body = r#"{"name": "half-mlp", "edits": ["blocks.2.hook_mlp_out=scale:0.5"]}"#;
        assert_eq!(http("POST", "/v1/edits", body).0, "201");
        let requests = varied_requests();
        // Alone: one request at a time, a pass each.
        let alone: Vec<_> = requests
            .iter()
            .map(|r| sorted(&client.forward(r).unwrap()))
            .collect();
        let passes = client.health().unwrap().passes;
        assert_eq!(passes, requests.len() as u64);
        // Together: sent at once, they share one pass.
        let together: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = requests
                .iter()
                .map(|r| {
                    let client = Client::new(&server.url, "erin-secret").unwrap();
                    s.spawn(move || sorted(&client.forward(r).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(client.health().unwrap().passes, passes + 1, "{layout:?}");
        for (i, (alone, together)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(alone, together, "{layout:?}: request {i}, bit for bit");
        }
        // Each got its own rows and positions only.
        let shape = |i: usize, name: &str| {
            let answer = client.forward(&requests[i]).unwrap();
            answer[name].dims().to_vec()
        };
        assert_eq!(shape(1, "blocks.1.hook_resid_post"), [1, 2, 64]);
        assert_eq!(shape(2, "blocks.0.attn.hook_pattern")[2..], [8, 8]);
    }
}

/// The server's health, polled until `done` holds (at most 10 s).
fn health_when(
    client: &Client,
    done: impl Fn(&flexmodel::api::Health) -> bool,
) -> flexmodel::api::Health {
    let start = std::time::Instant::now();
    loop {
        let health = client.health().unwrap();
        if done(&health) || start.elapsed() > std::time::Duration::from_secs(10) {
            return health;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_full_queue_says_when_to_retry_and_late_or_departed_requests_are_dropped_unrun() {
    let model = tiny_dir(15);
    let tokens = TokenFile::new("frank-secret\n");
    let options = ["--batch-window-ms", "2000", "--max-queue", "2"];
    let server = Server::start(model.path(), &tokens.path, &options);
    let client = Client::new(&server.url, "frank-secret").unwrap();
    let request = ForwardRequest::tokens([vec![1, 2, 3]]).hook("blocks.0.hook_resid_post");
    let body = serde_json::to_string(&request).unwrap();
    std::thread::scope(|s| {
        // Two requests wait out the window: the queue is full.
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let client = Client::new(&server.url, "frank-secret").unwrap();
                let request = request.clone();
                s.spawn(move || client.forward(&request))
            })
            .collect();
        health_when(&client, |h| h.queue == 2);
        let out = Command::new("curl")
            .args(["-sS", "-i", "-H", "Authorization: Bearer frank-secret"])
            .args(["-H", "Content-Type: application/json", "--data", &body])
            .arg(format!("{}/v1/forward", server.url))
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(answer.starts_with("http/1.1 429"), "{answer}");
        let retry: u64 = answer
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After: {answer}"));
        assert!(retry >= 1, "{answer}");
        assert!(answer.contains("the queue is full"), "{answer}");
        for handle in waiting {
            assert!(
                handle.join().unwrap().is_ok(),
                "accepted requests are answered"
            );
        }
    });
    let passes = client.health().unwrap().passes;
    assert_eq!(passes, 1);

    // A deadline shorter than the window: 504 at the deadline, and the request never runs.
    let start = std::time::Instant::now();
    let late = client.forward(&request.clone().deadline_ms(300));
    let took = start.elapsed();
    assert!(
        matches!(&late, Err(ClientError::Server { status: 504, message }) if message.contains("300 ms")),
        "{late:?}"
    );
    assert!(
        took < std::time::Duration::from_millis(1500),
        "took {took:?}"
    );
    let health = health_when(&client, |h| h.cancelled == 1);
    assert_eq!(
        (health.cancelled, health.passes, health.queue),
        (1, passes, 0)
    );

    // A client that hangs up before its pass: dropped unrun, the server unharmed.
    let hung_up = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "0.5",
            "-H",
            "Authorization: Bearer frank-secret",
        ])
        .args(["-H", "Content-Type: application/json", "--data", &body])
        .arg(format!("{}/v1/forward", server.url))
        .output()
        .unwrap();
    assert_eq!(hung_up.status.code(), Some(28), "curl timed out");
    let health = health_when(&client, |h| h.cancelled == 2);
    assert_eq!(
        (health.cancelled, health.passes, health.queue),
        (2, passes, 0)
    );
    assert!(client.forward(&request).is_ok());
    assert_eq!(client.health().unwrap().passes, passes + 1);
}

/// The pids of the processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_worker_lost_mid_pass_fails_that_pass_with_503_naming_its_rank_and_the_server_recovers() {
    let model = tiny_dir(16);
    let tokens = TokenFile::new("grace-secret\n");
    let options = ["--procs", "--tp", "2", "--batch-window-ms", "300"];
    let server = Server::start(model.path(), &tokens.path, &options);
    let client = Client::new(&server.url, "grace-secret").unwrap();
    let request = ForwardRequest::tokens([vec![4, 5, 6, 7]]).hook("blocks.3.hook_resid_post");
    let before = sorted(&client.forward(&request).unwrap());
    let workers = children(server.child.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    // Stopped, a worker answers no more: the pass waits on it until its heartbeats stop.
    let victim = workers[1];
    assert!(
        Command::new("kill")
            .args(["-STOP", &victim.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let failed: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let client = Client::new(&server.url, "grace-secret").unwrap();
                let request = request.clone();
                s.spawn(move || client.forward(&request))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let _ = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    for answer in failed {
        match answer {
            Err(ClientError::Server {
                status: 503,
                message,
            }) => {
                assert!(message.starts_with("rank "), "{message}")
            }
            other => panic!("expected 503 naming the rank, got {other:?}"),
        }
    }
    // The server builds its ranks again and answers as before.
    let after = sorted(&client.forward(&request).unwrap());
    assert_eq!(after, before);
    let health = client.health().unwrap();
    assert_eq!(health.ranks_alive, 2);
    let workers_now = children(server.child.id());
    assert_eq!(workers_now.len(), 2, "{workers_now:?}");
    assert!(!workers_now.contains(&victim));
}

#[test]
fn a_served_generation_is_what_generate_prints_and_streams_a_token_per_event() {
    let model = tiny_dir(17);
    let tokens = TokenFile::new("heidi-secret\n");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("generation.safetensors");
    let prompts = ["hello world", "ab"];
    let edit = "blocks.1.hook_resid_post=scale:1.5";
    let mut args = vec![
        "generate",
        "--model",
        model.path().to_str().unwrap(),
        "--json",
    ];
    for prompt in prompts {
        args.extend(["--prompt", prompt]);
    }
    args.extend(["--max-new-tokens", "6", "--edit", edit, "--tp", "2"]);
    args.extend([
        "--hook",
        "blocks.0.hook_resid_post",
        "--out",
        out.to_str().unwrap(),
    ]);
    let printed = succeeded(&args);
    let expected: serde_json::Value =
        serde_json::from_str(printed.lines().last().unwrap()).unwrap();

    let server = Server::start(model.path(), &tokens.path, &["--tp", "2"]);
    let client = Client::new(&server.url, "heidi-secret").unwrap();
    let request = flexmodel::api::GenerateRequest::prompts(prompts)
        .max_new_tokens(6)
        .edit(edit)
        .hook("blocks.0.hook_resid_post");
    let answer = client.generate(&request).unwrap();
    assert_eq!(
        serde_json::to_value(&answer.completions).unwrap(),
        expected["completions"]
    );
    let captures = sorted(&answer.captures().unwrap());
    assert_eq!(
        captures,
        tensors(&out),
        "the captures generate --out writes"
    );

    // Streamed: a `token` event per generated token, then `done` with the same answer.
    let body = serde_json::to_string(&flexmodel::api::GenerateRequest {
        stream: true,
        ..request.clone()
    })
    .unwrap();
    let streamed = Command::new("curl")
        .args(["-sS", "-N", "-H", "Authorization: Bearer heidi-secret"])
        .args(["-H", "Content-Type: application/json", "--data", &body])
        .arg(format!("{}/v1/generate", server.url))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&streamed.stdout).to_string();
    let events: Vec<(String, serde_json::Value)> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let field = |name: &str| {
                e.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {e:?}"))
                    .trim()
                    .to_string()
            };
            (
                field("event:"),
                serde_json::from_str(&field("data:")).unwrap(),
            )
        })
        .collect();
    let generated: usize = answer
        .completions
        .iter()
        .zip(prompts)
        .map(|(c, p)| {
            c.tokens.len()
                - flexmodel::Checkpoint::open(model.path().to_str().unwrap())
                    .unwrap()
                    .tokenizer
                    .encode(p)
                    .unwrap()
                    .len()
        })
        .sum();
    let (last, token_events) = events.split_last().unwrap();
    assert_eq!(token_events.len(), generated, "{text}");
    assert!(
        token_events
            .iter()
            .all(|(name, data)| name == "token" && data["token"].is_u64())
    );
    assert_eq!(last.0, "done");
    assert_eq!(last.1["completions"], expected["completions"]);

    let refused = client.generate(&request.clone().max_new_tokens(0));
    assert!(
        matches!(&refused, Err(ClientError::Server { status: 400, message }) if message.contains("max_new_tokens")),
        "{refused:?}"
    );
}

#[test]
fn gradients_of_the_loss_are_what_capture_grad_writes_and_of_a_logit_difference_match_finite_differences()
 {
    use flexmodel::api::GradMetric;
    let model = tiny_dir(18);
    let tokens = TokenFile::new("ivan-secret\n");
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.txt");
    std::fs::write(&rows, "5 17 200 3 99\n1 2 3\n").unwrap();
    let out = dir.path().join("grad.safetensors");
    let hook = "blocks.1.hook_resid_pre";
    succeeded(&[
        "capture",
        "--model",
        model.path().to_str().unwrap(),
        "--tokens-file",
        rows.to_str().unwrap(),
        "--hook",
        hook,
        "--grad",
        "--out",
        out.to_str().unwrap(),
    ]);
    let server = Server::start(model.path(), &tokens.path, &[]);
    let client = Client::new(&server.url, "ivan-secret").unwrap();
    let request = ForwardRequest::tokens([vec![5, 17, 200, 3, 99], vec![1, 2, 3]]).hook(hook);
    let answer = client
        .forward(&request.clone().grad(GradMetric::Loss))
        .unwrap();
    assert_eq!(sorted(&answer), tensors(&out), "as capture --grad writes");

    // d(logit 7 − logit 9)/d(a vector added at every position) is the sum of the
    // gradient over sequences and positions; finite differences of the metric agree.
    let metric = GradMetric::LogitDiff {
        answer: 7,
        wrong: 9,
    };
    let answer = client.forward(&request.clone().grad(metric)).unwrap();
    let grad = &answer[&format!("{hook}_grad")];
    assert_eq!(grad.dims(), [2, 5, 64]);
    let summed = bytes_of(&grad.sum((0, 1)).unwrap());
    let eps = 1e-2f32;
    let mut worst = 0f32;
    for j in [0usize, 13, 40] {
        let value = |sign: f32| {
            let mut delta = vec![0f32; 64];
            delta[j] = sign * eps;
            let delta = Tensor::from_vec(delta, 64, &Device::Cpu).unwrap();
            let shifted = request.clone().add(hook, &delta).unwrap().grad(metric);
            bytes_of(&client.forward(&shifted).unwrap()["loss"])[0]
        };
        let numeric = (value(1.0) - value(-1.0)) / (2.0 * eps);
        let error = (numeric - summed[j]).abs() / summed[j].abs().max(1e-3);
        eprintln!(
            "latent {j}: analytic {} numeric {numeric} error {error:e}",
            summed[j]
        );
        worst = worst.max(error);
    }
    // Measured: 3.4e-3 at worst (float32 differences of a step of 1e-2).
    assert!(worst < 2e-2, "finite differences differ by {worst:e}");
    let refused = client.forward(&request.clone().logits("last").grad(metric));
    assert!(
        matches!(&refused, Err(ClientError::Server { status: 400, message }) if message.contains("grad")),
        "{refused:?}"
    );
}

#[test]
fn with_a_certificate_the_server_speaks_https_only_and_a_silent_client_holds_up_no_one() {
    let model = tiny_dir(19);
    let tokens = TokenFile::new("judy-secret\n");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // A server's certificate, not a CA's (webpki refuses a CA's as the server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let options = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let server = Server::start(model.path(), &tokens.path, &options);
    let https = server.url.replace("http://", "https://");
    // A client that connects and never speaks.
    let _silent = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    let body = r#"{"tokens": [[5, 6, 7, 8]], "hooks": ["blocks.3.hook_resid_post"]}"#;
    let curl = |url: &str, extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(extra)
            .args(["-H", "Authorization: Bearer judy-secret", "--data", body])
            .arg(format!("{url}/v1/forward"))
            .output()
            .unwrap()
    };
    let trusted = curl(&https, &["--cacert", cert.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&trusted.stdout), "200");
    // Python's requests, trusting the certificate, gets the same tensors.
    let script = format!(
        r#"
import requests
from safetensors.numpy import load
answer = requests.post("{https}/v1/forward", headers={{"Authorization": "Bearer judy-secret"}},
                       data='{body}', verify="{cert}")
answer.raise_for_status()
print(sorted(load(answer.content)))
"#,
        cert = cert.display()
    );
    assert!(python(&script).contains("blocks.3.hook_resid_post"));
    // The Rust client, trusting the certificate.
    let client = Client::with_ca(&https, "judy-secret", &cert).unwrap();
    let request = ForwardRequest::tokens([vec![5, 6, 7, 8]]).hook("blocks.3.hook_resid_post");
    let answer = client.forward(&request);
    assert!(answer.is_ok(), "{answer:?}");
    let stranger = Client::new(&https, "judy-secret")
        .unwrap()
        .forward(&request);
    assert!(
        matches!(stranger, Err(ClientError::Http(_))),
        "{stranger:?}"
    );
    // Not trusted, or plain HTTP: no answer.
    let untrusted = curl(&https, &[]);
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "the certificate is not trusted"
    );
    let plain = curl(&server.url, &[]);
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}

#[test]
fn chosen_positions_and_their_mean_are_taken_on_the_server() {
    use flexmodel::api::{NamedPositions, Positions, Reduce};
    let model = tiny_dir(20);
    let tokens = TokenFile::new("leo-secret\n");
    let server = Server::start(model.path(), &tokens.path, &[]);
    let client = Client::new(&server.url, "leo-secret").unwrap();
    let (resid, pattern) = ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern");
    // The second sequence is left-padded: its tokens are positions 2, 3 and 4.
    let request = ForwardRequest::tokens([vec![5, 17, 200, 3, 99], vec![1, 2, 3]])
        .hook(resid)
        .hook(pattern);
    let full = client.forward(&request).unwrap();
    let ask = |positions: Option<Positions>, reduce: Option<Reduce>| {
        let request = ForwardRequest {
            positions,
            reduce,
            ..request.clone()
        };
        client.forward(&request)
    };
    let last = ask(Some(Positions::Named(NamedPositions::Last)), None).unwrap();
    assert_eq!(
        bytes_of(&last[resid]),
        bytes_of(&full[resid].narrow(1, 4, 1).unwrap())
    );
    // A pattern's positions are its queries.
    assert_eq!(last[pattern].dims(), [2, 8, 1, 5]);
    assert_eq!(
        bytes_of(&last[pattern]),
        bytes_of(&full[pattern].narrow(2, 4, 1).unwrap())
    );
    let listed = ask(Some(Positions::List(vec![3, 0])), None).unwrap();
    let ids = Tensor::new(&[3u32, 0], &Device::Cpu).unwrap();
    assert_eq!(
        bytes_of(&listed[resid]),
        bytes_of(&full[resid].index_select(&ids, 1).unwrap())
    );
    // The mean is over each sequence's real tokens.
    let mean = ask(None, Some(Reduce::Mean)).unwrap();
    assert_eq!(mean[resid].dims(), [2, 64]);
    let expected = Tensor::cat(
        &[
            &full[resid].narrow(0, 0, 1).unwrap().mean(1).unwrap(),
            &full[resid]
                .narrow(0, 1, 1)
                .unwrap()
                .narrow(1, 2, 3)
                .unwrap()
                .mean(1)
                .unwrap(),
        ],
        0,
    )
    .unwrap();
    let worst = common::max_abs_diff(&mean[resid], &expected);
    assert!(worst < 1e-6, "{worst:e}");
    for bad in [vec![5], vec![]] {
        let refused = ask(Some(Positions::List(bad.clone())), None);
        assert!(
            matches!(&refused, Err(ClientError::Server { status: 400, message }) if message.contains("positions")),
            "{bad:?}: {refused:?}"
        );
    }
}

#[test]
fn a_server_over_a_job_answers_as_threads_do_and_goes_on_with_a_replacement_worker() {
    use common::etcd::{JobWorker, TestJob, members, wait_for_members};
    let mut job = TestJob::start("serve", 1, 2);
    let model = tiny_dir(21);
    let token = std::fs::read_to_string(&job.token.path).unwrap();
    let token = token.trim();
    let url = job.url.to_string();
    let request = ForwardRequest::tokens([vec![3, 1, 4, 1, 5], vec![9, 2, 6]])
        .hook("blocks.*.hook_resid_post")
        .edit("blocks.1.attn.hook_z=zero-head:2");
    let threads = Server::start(model.path(), &job.token.path, &["--tp", "2"]);
    let expected = sorted(
        &Client::new(&threads.url, token)
            .unwrap()
            .forward(&request)
            .unwrap(),
    );
    drop(threads);
    let options = ["--tp", "2", "--cluster", url.as_str()];
    let server = Server::start(model.path(), &job.token.path, &options);
    let client = Client::new(&server.url, token).unwrap();
    assert_eq!(
        sorted(&client.forward(&request).unwrap()),
        expected,
        "as threads answer"
    );
    // A worker dies between passes and a replacement joins the job: the server's next
    // pass takes it (the job's driver waits for the rank to be filled).
    let victim = members(&job.url)[0].pid;
    common::processes::signal(victim, "KILL");
    job.workers.push(JobWorker::start(
        &job.url,
        Some(&job.token.path),
        "127.0.0.1:0",
    ));
    wait_for_members(&job.url, 2);
    assert_eq!(sorted(&client.forward(&request).unwrap()), expected);
    assert_eq!(client.health().unwrap().ranks_alive, 2);
}
