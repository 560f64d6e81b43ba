//! A client of CRI's PullImage (`runtime.v1.ImageService`) on containerd's socket:
//! the one containerd 1.6 client that pulls through the unpacker that labels its
//! Prepares with the chain ID (`containerd.io/snapshot.ref`), as `ctr image pull`
//! does not. The messages by hand (the fields of cri-api's api.proto). Used by
//! tests/containerd.rs and, through examples/cri-pull.rs, by
//! scripts/bench-containerd.sh.

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// Pulls `image` through containerd's CRI plugin at `sock`.
pub fn pull(sock: &std::path::Path, image: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let path = sock.to_path_buf();
    rt.block_on(async move {
        let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| e.to_string())?;
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.map_err(|e| e.to_string())?;
        let r: tonic::Response<PullImageResponse> = g
            .unary(
                tonic::Request::new(PullImageRequest {
                    image: Some(ImageSpec {
                        image: image.into(),
                    }),
                }),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/runtime.v1.ImageService/PullImage",
                ),
                tonic::codec::ProstCodec::default(),
            )
            .await
            .map_err(|e| format!("{}: {}", e.code(), e.message()))?;
        Ok(r.into_inner().image_ref)
    })
}
