//! A small HTTP peer for skiff's demo and tests (hyper, HTTP/1.1).
//!
//! ```text
//! skiff-httppeer serve <addr> <name>          answer every request `200 <name>` (path `/delay/<ms>`:
//!                                             after that many milliseconds); prints `ready local=..`
//! skiff-httppeer get <addr> <host> [<path>]   one GET with that Host; prints `status=<code> body=<body>
//!                                             connection=<Connection header or ->`
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: skiff-httppeer serve <addr> <name> | get <addr> <host> [<path>]";
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = args.get(1).and_then(|a| a.parse::<SocketAddr>().ok());
    match (args.first().map(String::as_str), addr, args.get(2)) {
        (Some("serve"), Some(addr), Some(name)) => rt.block_on(serve(addr, name.clone())),
        (Some("get"), Some(addr), Some(host)) => {
            let path = args.get(3).cloned().unwrap_or_else(|| "/".into());
            rt.block_on(get(addr, host, &path))
        }
        _ => {
            eprintln!("{usage}");
            ExitCode::from(2)
        }
    }
}

async fn serve(addr: SocketAddr, name: String) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            println!("err stage=bind msg={}", e.to_string().replace(' ', "_"));
            return ExitCode::FAILURE;
        }
    };
    println!("ready local={addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = Bytes::from(name.clone());
                let delay = req
                    .uri()
                    .path()
                    .strip_prefix("/delay/")
                    .and_then(|ms| ms.parse().ok())
                    .map(Duration::from_millis);
                async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> ExitCode {
    let run = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let connection = resp
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body, connection))
    };
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok((status, body, connection))) => {
            let body = String::from_utf8_lossy(&body).trim().replace(' ', "_");
            println!("status={status} body={body} connection={connection}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            println!("err msg={}", e.to_string().replace(' ', "_"));
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("err msg=timeout");
            ExitCode::FAILURE
        }
    }
}
