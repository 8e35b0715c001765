//! Tests of the Docker runtime against the real engine, with the demo image that
//! `scripts/demo-image.sh` builds (built here if it is missing).
//!
//! Each test runs as a drone of its own (a unique `hangar.drone` label), so tests running in
//! parallel never see each other's containers, and removes every container labelled with it
//! when it ends, pass or fail. Without a reachable engine the tests fail when `CI` is set and
//! say loudly that they were skipped otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use hangar_core::api::Resources;
use hangar_core::drone::{BackendEvent, DroneMessage, SchedulerMessage};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::agent::{Agent, AgentConfig};

const DEMO_IMAGE: &str = "hangar-demo:dev";

/// Generous bound on any single wait, so that a broken test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(30);

/// A drone name for one test; removes the containers labelled with it on drop.
struct TestDrone {
    name: String,
}

impl TestDrone {
    /// Checks the engine and the demo image. `None` (after saying so) when no engine is
    /// reachable and this is not CI; in CI that is a failure.
    async fn new(test: &str) -> Option<TestDrone> {
        let docker = match engine().await {
            Ok(docker) => docker,
            Err(error) => {
                let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
                assert!(
                    !ci,
                    "the docker engine at {DEFAULT_DOCKER_HOST} is unreachable ({error}): \
                     the docker runtime tests need it in CI; start dockerd"
                );
                eprintln!(
                    "SKIPPED {test}: the docker engine at {DEFAULT_DOCKER_HOST} is unreachable \
                     ({error}); start dockerd to run the docker runtime tests"
                );
                return None;
            }
        };
        ensure_demo_image(&docker).await;
        Some(TestDrone {
            name: format!(
                "t-{test}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
        })
    }

    /// A configuration for this drone with a new run id, as a new agent process would have.
    fn config(&self) -> DockerRuntimeConfig {
        let mut config = DockerRuntimeConfig::new(&self.name, new_run_id());
        config.default_image = Some(DEMO_IMAGE.to_string());
        config
    }

    fn runtime(&self) -> DockerRuntime {
        DockerRuntime::connect(self.config()).unwrap()
    }
}

impl Drop for TestDrone {
    fn drop(&mut self) {
        // Synchronous (drop may run outside any runtime, or while a test unwinds), hence the
        // docker CLI rather than bollard.
        let filter = format!("label={LABEL_DRONE}={}", self.name);
        let Ok(listed) = Command::new("docker")
            .args(["ps", "--all", "--quiet", "--filter", &filter])
            .output()
        else {
            return;
        };
        let ids = String::from_utf8_lossy(&listed.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "--force", "--volumes"])
                .args(&ids)
                .output();
        }
    }
}

fn new_run_id() -> String {
    format!("run-{:016x}", rand::random::<u64>())
}

/// A client for checks made beside the runtime.
async fn engine() -> Result<Docker, DockerError> {
    let docker = engine_client(DEFAULT_DOCKER_HOST).await?;
    docker.ping().await?;
    Ok(docker)
}

async fn ensure_demo_image(docker: &Docker) {
    if docker.inspect_image(DEMO_IMAGE).await.is_ok() {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo-image.sh");
    eprintln!(
        "{DEMO_IMAGE} is missing: building it with {}",
        script.display()
    );
    let status = tokio::task::spawn_blocking(move || Command::new(&script).status())
        .await
        .unwrap();
    assert!(
        matches!(&status, Ok(status) if status.success()),
        "cannot build {DEMO_IMAGE} ({status:?}): run scripts/demo-image.sh and read its output"
    );
}

fn spawn_command() -> SpawnCommand {
    SpawnCommand {
        backend: BackendId::generate(),
        key: Some("default/doc".to_string()),
        epoch: 7,
        command: None,
        image: Some(DEMO_IMAGE.to_string()),
        env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
        resources: Resources::default(),
        startup_timeout_ms: 20_000,
    }
}

async fn request(
    method: Method,
    address: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// `GET path`, retried until it answers 200 (the backend may still be starting to listen).
async fn get_ok(address: SocketAddr, path: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let outcome = request(Method::GET, address, path).await;
        match outcome {
            Ok((StatusCode::OK, body)) => return body,
            other if Instant::now() >= deadline => {
                panic!("GET http://{address}{path} never answered 200: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn exit_code(exit: ExitWatch) -> Option<i32> {
    tokio::time::timeout(WAIT, exit)
        .await
        .expect("no exit delivered in time")
        .expect("exit watch dropped without a status")
        .code
}

/// Waits until the container is gone.
async fn removed(docker: &Docker, container: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        match docker.inspect_container(container, None).await {
            Err(error) if status_code(&error) == Some(404) => return,
            _ if Instant::now() >= deadline => panic!("container {container} was not removed"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn labels(info: &ContainerInspectResponse) -> HashMap<String, String> {
    info.config
        .as_ref()
        .and_then(|config| config.labels.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn start_publishes_the_port_applies_labels_and_caps_and_stops_with_sigterm() {
    let Some(drone) = TestDrone::new("start").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let mut config = drone.config();
    config.pids_limit = 128;
    let run_id = config.run_id.clone();
    let runtime = DockerRuntime::connect(config).unwrap();
    runtime.health().await.unwrap();
    let mut cmd = spawn_command();
    cmd.resources = Resources {
        cpu_millis: Some(250),
        memory_mb: Some(64),
    };
    let backend = cmd.backend.clone();

    let started = runtime.start(&cmd).await.unwrap();
    assert_eq!(started.backend, backend);
    assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(
        get_ok(started.address, "/").await,
        format!("hangar demo backend {backend} key default/doc epoch 7\n")
    );
    assert_eq!(runtime.running(), vec![backend.clone()]);

    let name = format!("hangar-{backend}");
    let info = docker.inspect_container(&name, None).await.unwrap();
    let labels = labels(&info);
    for (label, value) in [
        (LABEL_BACKEND_ID, backend.as_str()),
        (LABEL_DRONE, drone.name.as_str()),
        (LABEL_RUN_ID, run_id.as_str()),
        (LABEL_KEY, "default/doc"),
        (LABEL_EPOCH, "7"),
        (LABEL_NETWORK, "bridge"),
        (LABEL_PORT, "8080"),
    ] {
        assert_eq!(
            labels.get(label).map(String::as_str),
            Some(value),
            "{label}"
        );
    }
    let host_config = info.host_config.clone().unwrap();
    assert_eq!(host_config.nano_cpus, Some(250_000_000));
    assert_eq!(host_config.memory, Some(64 * 1024 * 1024));
    assert_eq!(host_config.pids_limit, Some(128));
    let env = info.config.as_ref().unwrap().env.clone().unwrap();
    for var in [
        "GREETING=hi",
        "HANGAR_BIND=0.0.0.0",
        "PORT=8080",
        "HANGAR_EPOCH=7",
    ] {
        assert!(env.iter().any(|e| e == var), "{var} not in {env:?}");
    }

    let stats = runtime.stats(&backend).await.unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert!(stats.cpu_seconds_total >= 0.0, "{stats:?}");

    // The demo backend exits 0 on SIGTERM, well within the grace.
    let begin = Instant::now();
    runtime
        .stop(&backend, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        begin.elapsed() < Duration::from_secs(10),
        "{:?}",
        begin.elapsed()
    );
    assert_eq!(exit_code(started.exit).await, Some(0));
    removed(&docker, &name).await;
    assert!(runtime.running().is_empty());
    assert!(matches!(
        runtime.stop(&backend, Duration::ZERO).await,
        Err(RuntimeError::NotRunning { .. })
    ));
    assert!(matches!(
        runtime.stats(&backend).await,
        Err(RuntimeError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn exit_code_comes_from_the_engine_and_the_container_is_removed() {
    let Some(drone) = TestDrone::new("exit").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let runtime = drone.runtime();
    let cmd = spawn_command();
    let started = runtime.start(&cmd).await.unwrap();
    get_ok(started.address, "/healthz").await;
    let (status, _) = request(Method::POST, started.address, "/exit/3")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(exit_code(started.exit).await, Some(3));
    removed(&docker, &format!("hangar-{}", cmd.backend)).await;
}

#[tokio::test]
async fn zero_grace_kills_at_once() {
    let Some(drone) = TestDrone::new("kill").await else {
        return;
    };
    let runtime = drone.runtime();
    let cmd = spawn_command();
    let started = runtime.start(&cmd).await.unwrap();
    get_ok(started.address, "/healthz").await;
    runtime.stop(&cmd.backend, Duration::ZERO).await.unwrap();
    assert_eq!(exit_code(started.exit).await, Some(128 + libc::SIGKILL));
}

#[tokio::test]
async fn missing_image_and_no_image_are_refused_with_what_to_do() {
    let Some(drone) = TestDrone::new("image").await else {
        return;
    };
    let runtime = drone.runtime();
    let mut cmd = spawn_command();
    cmd.image = Some("hangar-missing-image:nope".to_string());
    let error = runtime.start(&cmd).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::ImageMissing { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "image hangar-missing-image:nope is not present on drone {}: build or load it with \
             docker (there is no registry)",
            drone.name
        )
    );
    assert!(runtime.running().is_empty());

    let mut config = drone.config();
    config.default_image = None;
    let runtime = DockerRuntime::connect(config).unwrap();
    cmd.image = None;
    assert!(matches!(
        runtime.start(&cmd).await,
        Err(RuntimeError::NoImage { .. })
    ));
}

#[tokio::test]
async fn a_container_that_exits_at_once_reports_its_code_and_output() {
    let Some(drone) = TestDrone::new("crash").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let runtime = drone.runtime();
    let mut cmd = spawn_command();
    // `hangar demo-backend --no-such-flag`: the argument parser refuses it with code 2.
    cmd.command = Some(vec!["--no-such-flag".to_string()]);
    match runtime.start(&cmd).await {
        // Usually: gone before its address could be read.
        Err(RuntimeError::ExitedAtStart { code, output, .. }) => {
            assert_eq!(code, "2");
            // The output is best effort: the exit watcher may remove the container before its
            // logs are read; when there is output, it is the backend's.
            assert!(
                output.is_empty() || output.contains("--no-such-flag"),
                "{output}"
            );
        }
        // Or it exits just after: the exit watch says how.
        Ok(started) => assert_eq!(exit_code(started.exit).await, Some(2)),
        Err(other) => panic!("unexpected error: {other}"),
    }
    removed(&docker, &format!("hangar-{}", cmd.backend)).await;
    assert!(runtime.running().is_empty());
}

#[tokio::test]
async fn a_new_agent_run_adopts_running_containers_and_removes_exited_ones() {
    let Some(drone) = TestDrone::new("adopt").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let first = drone.runtime();
    let kept = spawn_command();
    let gone = spawn_command();
    let kept_started = first.start(&kept).await.unwrap();
    let gone_started = first.start(&gone).await.unwrap();
    assert_eq!(get_ok(kept_started.address, "/count").await, "1");
    get_ok(gone_started.address, "/healthz").await;

    // The agent process goes away; its containers do not. One of them exits while no agent
    // watches it.
    drop(first);
    let gone_name = format!("hangar-{}", gone.backend);
    docker
        .stop_container(
            &gone_name,
            Some(StopContainerOptionsBuilder::new().t(5).build()),
        )
        .await
        .unwrap();

    let second = drone.runtime();
    let adopted = second.adopt().await.unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    let adopted = adopted.into_iter().next().unwrap();
    assert_eq!(adopted.backend, kept.backend);
    assert_eq!(adopted.address, kept_started.address);
    assert_eq!(second.running(), vec![kept.backend.clone()]);
    // The same process, with its state.
    assert_eq!(get_ok(adopted.address, "/count").await, "2");
    removed(&docker, &gone_name).await;
    // Adopting again finds nothing new.
    assert!(second.adopt().await.unwrap().is_empty());

    // Its exit reaches the new run's watch, with the engine's code.
    let (status, _) = request(Method::POST, adopted.address, "/exit/4")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(exit_code(adopted.exit).await, Some(4));
    removed(&docker, &format!("hangar-{}", kept.backend)).await;
}

#[tokio::test]
async fn start_adopts_its_running_container_replaces_a_stopped_one_and_refuses_a_foreign_one() {
    let Some(drone) = TestDrone::new("rename").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let first = drone.runtime();
    let cmd = spawn_command();
    let original = first.start(&cmd).await.unwrap();
    assert!(matches!(
        first.start(&cmd).await,
        Err(RuntimeError::AlreadyRunning { .. })
    ));

    // An agent that restarted and is sent the same spawn again gets the running container.
    let second = drone.runtime();
    let again = second.start(&cmd).await.unwrap();
    assert_eq!(again.address, original.address);
    assert_eq!(get_ok(again.address, "/count").await, "1");
    second
        .stop(&cmd.backend, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(exit_code(again.exit).await, Some(0));
    // The first run watches the same container through its own event stream.
    assert_eq!(exit_code(original.exit).await, Some(0));

    // A container of this backend that does not run (created, never started) is replaced.
    let leftover = spawn_command();
    let spec = second.container_spec(&leftover, DEMO_IMAGE, DEFAULT_CONTAINER_PORT);
    let name = format!("hangar-{}", leftover.backend);
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    let stale = docker
        .create_container(Some(options), spec)
        .await
        .unwrap()
        .id;
    let replaced = second.start(&leftover).await.unwrap();
    assert_eq!(get_ok(replaced.address, "/count").await, "1");
    let info = docker.inspect_container(&name, None).await.unwrap();
    assert_ne!(info.id.as_deref(), Some(stale.as_str()));
    second
        .stop(&leftover.backend, Duration::ZERO)
        .await
        .unwrap();

    // A container under the name that is not this backend's is left alone.
    let foreign = spawn_command();
    let mut spec = second.container_spec(&foreign, DEMO_IMAGE, DEFAULT_CONTAINER_PORT);
    spec.labels
        .as_mut()
        .unwrap()
        .insert(LABEL_BACKEND_ID.to_string(), "someone-else".to_string());
    let name = format!("hangar-{}", foreign.backend);
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    docker.create_container(Some(options), spec).await.unwrap();
    let error = second.start(&foreign).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::ContainerNameTaken { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("docker rm -f"), "{error}");
}

#[tokio::test]
async fn host_networking_listens_on_an_allocated_port() {
    let Some(drone) = TestDrone::new("host").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let mut config = drone.config();
    config.network = DockerNetwork::Host;
    let runtime = DockerRuntime::connect(config.clone()).unwrap();
    let cmd = spawn_command();
    let started = runtime.start(&cmd).await.unwrap();
    assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(get_ok(started.address, "/count").await, "1");
    let info = docker
        .inspect_container(&format!("hangar-{}", cmd.backend), None)
        .await
        .unwrap();
    assert_eq!(
        info.host_config.as_ref().unwrap().network_mode.as_deref(),
        Some("host")
    );
    let port = started.address.port().to_string();
    assert_eq!(labels(&info).get(LABEL_PORT), Some(&port));

    // A later run finds the address from the labels.
    drop(runtime);
    config.run_id = new_run_id();
    let second = DockerRuntime::connect(config).unwrap();
    let adopted = second.adopt().await.unwrap();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].address, started.address);
    assert_eq!(get_ok(started.address, "/count").await, "2");
    second
        .stop(&cmd.backend, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn reconciliation_delivers_exits_the_event_stream_missed() {
    let Some(drone) = TestDrone::new("reconcile").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let runtime = drone.runtime();
    // A container of this drone that exits before the runtime watches it: its `die` event
    // goes to nobody, as when the stream was down.
    let cmd = spawn_command();
    let spec = runtime.container_spec(&cmd, DEMO_IMAGE, DEFAULT_CONTAINER_PORT);
    let options = CreateContainerOptionsBuilder::new()
        .name(&format!("hangar-{}", cmd.backend))
        .build();
    let container = docker
        .create_container(Some(options), spec)
        .await
        .unwrap()
        .id;
    docker.start_container(&container, None).await.unwrap();
    let info = docker.inspect_container(&container, None).await.unwrap();
    let address = address_of(&info, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    get_ok(address, "/healthz").await;
    request(Method::POST, address, "/exit/5").await.unwrap();
    let waited = docker
        .wait_container(&container, None)
        .next()
        .await
        .unwrap();
    assert!(
        matches!(
            waited,
            Err(DockerError::DockerContainerWaitError { code: 5, .. })
        ),
        "{waited:?}"
    );

    let exit = runtime.inner.track(&cmd.backend, &container).unwrap();
    // A watched container that vanished behind the runtime's back ends with an unknown code.
    let vanished = BackendId::generate();
    let vanished_exit = runtime
        .inner
        .track(
            &vanished,
            "0000000000000000000000000000000000000000000000000000000000000000",
        )
        .unwrap();
    runtime.inner.reconcile(&docker).await.unwrap();
    assert_eq!(exit_code(exit).await, Some(5));
    assert_eq!(exit_code(vanished_exit).await, None);
    removed(&docker, &container).await;
    assert!(runtime.running().is_empty());
}

#[tokio::test]
async fn agent_with_docker_runtime_reports_waiting_ready_failure_and_exit() {
    let Some(drone) = TestDrone::new("agent").await else {
        return;
    };
    let runtime = Arc::new(drone.runtime());
    let (commands, commands_rx) = mpsc::channel(16);
    let (events_tx, mut events) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let config = AgentConfig {
        stop_grace: Duration::from_secs(5),
        spawn_policy: crate::policy::SpawnPolicy {
            commands: Vec::new(),
            images: vec!["hangar-*".into()],
        },
        ..Default::default()
    };
    let agent = tokio::spawn(Agent::new(runtime.clone(), config).run(
        commands_rx,
        events_tx,
        cancel.clone(),
    ));
    let mut next = async |backend: &BackendId| {
        let message = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("timed out waiting for a backend event")
            .expect("agent hung up");
        let DroneMessage::Event { backend: b, event } = message else {
            panic!("expected a backend event, got {message:?}");
        };
        assert_eq!(&b, backend, "event {event:?} for another backend");
        event
    };

    // The drone's default image.
    let mut cmd = spawn_command();
    cmd.image = None;
    commands
        .send(SchedulerMessage::Spawn(cmd.clone()))
        .await
        .unwrap();
    assert_eq!(next(&cmd.backend).await, BackendEvent::Starting);
    let BackendEvent::Waiting { address } = next(&cmd.backend).await else {
        panic!("expected waiting");
    };
    assert_eq!(next(&cmd.backend).await, BackendEvent::Ready { address });
    assert_eq!(
        get_ok(address, "/").await,
        format!(
            "hangar demo backend {} key default/doc epoch 7\n",
            cmd.backend
        )
    );

    commands
        .send(SchedulerMessage::Terminate {
            backend: cmd.backend.clone(),
            hard: false,
        })
        .await
        .unwrap();
    assert_eq!(
        next(&cmd.backend).await,
        BackendEvent::Exited { exit_code: Some(0) }
    );

    let mut missing = spawn_command();
    missing.image = Some("hangar-missing-image:nope".to_string());
    commands
        .send(SchedulerMessage::Spawn(missing.clone()))
        .await
        .unwrap();
    assert_eq!(next(&missing.backend).await, BackendEvent::Starting);
    assert_eq!(
        next(&missing.backend).await,
        BackendEvent::SpawnFailed {
            message: format!(
                "image hangar-missing-image:nope is not present on drone {}: build or load it \
                 with docker (there is no registry)",
                drone.name
            )
        }
    );

    cancel.cancel();
    tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
}

#[tokio::test]
async fn health_and_calls_name_an_unreachable_daemon() {
    // Needs no engine: these engines do not exist.
    for host in ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"] {
        let mut config = DockerRuntimeConfig::new("unreachable", new_run_id());
        config.docker_host = Some(host.to_string());
        config.default_image = Some(DEMO_IMAGE.to_string());
        let runtime = DockerRuntime::connect(config).unwrap();
        let error = runtime.health().await.unwrap_err();
        assert!(
            error.starts_with(&format!("docker daemon unreachable at {host}: ")),
            "{error}"
        );
        assert!(
            error.ends_with(": start dockerd or fix --docker-host"),
            "{error}"
        );
        let start = runtime.start(&spawn_command()).await;
        assert!(
            matches!(start, Err(RuntimeError::DockerUnreachable { .. })),
            "{start:?}"
        );
        assert!(matches!(
            runtime.adopt().await,
            Err(RuntimeError::DockerUnreachable { .. })
        ));
    }
    let mut config = DockerRuntimeConfig::new("unreachable", new_run_id());
    config.docker_host = Some("ftp://docker.example".to_string());
    assert!(matches!(
        DockerRuntime::connect(config),
        Err(RuntimeError::InvalidDockerHost { .. })
    ));
}

#[test]
fn api_versions_and_event_times_are_parsed_and_formatted() {
    let parsed = |text| parse_api_version(text).map(|v| (v.major_version, v.minor_version));
    assert_eq!(parsed("1.41"), Some((1, 41)));
    assert_eq!(
        parsed("1.41\n"),
        Some((1, 41)),
        "the engine's refusal may end with a newline"
    );
    assert_eq!(parsed("1.44."), Some((1, 44)));
    assert_eq!(parsed("abc"), None);
    assert_eq!(parsed("1"), None);
    let message = "client version 1.53 is too new. Maximum supported API version is 1.41";
    let version = message
        .rsplit_once("API version is ")
        .and_then(|(_, v)| parse_api_version(v))
        .unwrap();
    assert_eq!((version.major_version, version.minor_version), (1, 41));
    assert_eq!(
        unix_time(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
        "1700000000.000000005"
    );
}

/// Reads `backend`'s logs through the runtime until `done` holds for the text received (or
/// the read ends); returns the text and whether the read ended.
async fn logs_until(
    runtime: &Arc<DockerRuntime>,
    backend: &BackendId,
    tail: Option<u64>,
    follow: bool,
    done: impl Fn(&str) -> bool,
) -> (String, Option<Result<(), LogsError>>) {
    let (tx, mut rx) = mpsc::channel(64);
    let request = LogsRequest {
        request: 1,
        backend: backend.clone(),
        tail,
        follow,
    };
    let cancel = CancellationToken::new();
    let read = {
        let (runtime, cancel) = (runtime.clone(), cancel.clone());
        tokio::spawn(async move { runtime.logs(&request, tx, cancel).await })
    };
    let mut text = String::new();
    let mut ended = false;
    while !done(&text) {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(chunk)) => text.push_str(&chunk),
            Ok(None) => {
                ended = true;
                break;
            }
            Err(_) => panic!("no more logs within {WAIT:?}; got {text:?}"),
        }
    }
    if !ended {
        cancel.cancel();
    }
    let result = tokio::time::timeout(WAIT, read).await.unwrap().unwrap();
    (text, ended.then_some(result))
}

/// A container's logs come from the engine while it runs (a tail, then a follow that sees
/// each request's line), and from the drone's archive once it has ended and been removed.
#[tokio::test]
async fn logs_of_a_running_container_then_of_its_archive() {
    let Some(drone) = TestDrone::new("logs").await else {
        return;
    };
    let docker = engine().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = Arc::new(LogFiles::new(crate::logs::LogConfig::new(
        dir.path(),
        &drone.name,
    )));
    let mut config = drone.config();
    config.logs = Some(files.clone());
    let runtime = Arc::new(DockerRuntime::connect(config).unwrap());
    let cmd = spawn_command();
    let backend = cmd.backend.clone();
    let started = runtime.start(&cmd).await.unwrap();
    get_ok(started.address, "/").await;
    let name = format!("hangar-{backend}");
    let info = docker.inspect_container(&name, None).await.unwrap();
    let log_config = info.host_config.unwrap().log_config.unwrap();
    assert_eq!(log_config.typ.as_deref(), Some("local"));

    // The backend writes its access line after it has answered, and the engine stores it
    // after that: read the whole log again until the line is there.
    let deadline = Instant::now() + WAIT;
    let all = loop {
        let (all, end) = logs_until(&runtime, &backend, None, false, |_| false).await;
        assert!(matches!(end, Some(Ok(()))), "{end:?}");
        if all.contains("GET / 200") {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "no access line within {WAIT:?}: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(all.contains("listening on"), "{all:?}");
    let (last, _) = logs_until(&runtime, &backend, Some(1), false, |_| false).await;
    assert_eq!(last.lines().count(), 1, "{last:?}");

    let follow = {
        let (runtime, backend) = (runtime.clone(), backend.clone());
        tokio::spawn(async move {
            logs_until(&runtime, &backend, Some(0), true, |t| {
                t.contains("GET /count 200")
            })
            .await
        })
    };
    // The follow may start after this request: ask until the follow has seen one.
    let deadline = Instant::now() + WAIT;
    while !follow.is_finished() {
        get_ok(started.address, "/count").await;
        assert!(Instant::now() < deadline, "the follow saw no request line");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (seen, _) = follow.await.unwrap();
    assert!(seen.contains("GET /count 200"), "{seen:?}");

    runtime.stop(&backend, Duration::ZERO).await.unwrap();
    removed(&docker, &name).await;
    assert!(
        files.has(&backend),
        "the output was archived before the removal"
    );
    let (archived, end) = logs_until(&runtime, &backend, None, true, |_| false).await;
    assert!(
        matches!(end, Some(Ok(()))),
        "a follow of an ended backend ends"
    );
    assert!(archived.contains("listening on"), "{archived:?}");
    assert!(archived.contains("GET /count 200"), "{archived:?}");
}
