//! `spendflow.v1.Personnel`: user details and pictures, over [`Personnel`].
//!
//! Without a configured [`Personnel`] every call answers `FAILED_PRECONDITION` saying how to
//! enable it. An upload's header is checked (user exists, content type acceptable) before any
//! chunk is read; chunks stream into the image store as they arrive (never buffered whole).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::personnel_server::{Personnel as PersonnelRpc, PersonnelServer};
use spendflow_proto::v1::upload_image_request::Part;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::images::{self, CHUNK_BYTES, ImageError, ImageRef};
use crate::personnel::{Personnel, PersonnelError, UserDetails};
use crate::serve::auth::grpc::{caller, check, status as auth_status};

/// Largest message of an upload stream: a 1 MiB chunk and some framing.
pub const MAX_UPLOAD_MESSAGE_BYTES: usize = 1024 * 1024 + 1024;

/// Longest wait for the next message of an upload: a client that stalls longer is dropped and
/// its temporary file removed (it may retry).
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The chunks of an upload stream as the image store takes them: a second header, a failed
/// stream, a stall longer than `idle` or (when `declared` is not 0) a total other than
/// `declared` bytes is an error, so a truncated upload is never stored.
fn upload_chunks(
    stream: Streaming<pb::UploadImageRequest>,
    declared: u64,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, ImageError>> + Send {
    futures::stream::unfold(Some((stream, 0u64)), move |state| async move {
        let (mut stream, received) = state?;
        let message = match tokio::time::timeout(idle, stream.message()).await {
            Err(_) => {
                return Some((
                    Err(ImageError::Aborted {
                        message: format!("no data for {} s after {received} bytes", idle.as_secs()),
                    }),
                    None,
                ));
            }
            Ok(message) => message,
        };
        let item = match message {
            Ok(Some(pb::UploadImageRequest {
                part: Some(Part::Chunk(chunk)),
            })) => {
                let received = received + chunk.len() as u64;
                if declared != 0 && received > declared {
                    Err(ImageError::Invalid {
                        message: format!("the header declared {declared} bytes, but more arrived"),
                    })
                } else {
                    return Some((Ok(Bytes::from(chunk)), Some((stream, received))));
                }
            }
            Ok(Some(_)) => Err(ImageError::Invalid {
                message: "only the first UploadImage message may be a header; every later one \
                          must be a chunk"
                    .into(),
            }),
            Ok(None) if declared != 0 && received != declared => Err(ImageError::Invalid {
                message: format!(
                    "the stream ended after {received} of the {declared} bytes the header \
                     declared; nothing was stored"
                ),
            }),
            Ok(None) => return None,
            Err(e) => Err(ImageError::Aborted {
                message: format!("the client's stream failed: {}", e.message()),
            }),
        };
        Some((item, None))
    })
}

/// Answers `Personnel`, or `FAILED_PRECONDITION` when none is configured.
#[derive(Debug, Clone)]
pub struct PersonnelService {
    personnel: Option<Arc<Personnel>>,
}

impl PersonnelService {
    /// A service over `personnel` (`None`: every call explains how to configure it).
    pub fn new(personnel: Option<Arc<Personnel>>) -> Self {
        PersonnelService { personnel }
    }

    /// The tonic server, with the upload message size bound.
    pub fn server(self) -> PersonnelServer<PersonnelService> {
        PersonnelServer::new(self).max_decoding_message_size(MAX_UPLOAD_MESSAGE_BYTES)
    }

    fn personnel(&self) -> Result<&Personnel, Status> {
        self.personnel.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this server has no user directory or image store: start it with \
                 `spendflow run ... --mysql URL --hdfs URL` (or try `spendflow demo`, which has \
                 generated users and avatars)",
            )
        })
    }
}

/// The gRPC status for a [`PersonnelError`].
pub fn status(e: PersonnelError) -> Status {
    let code = match &e {
        PersonnelError::NotFound(_) => Code::NotFound,
        PersonnelError::Invalid { .. } => Code::InvalidArgument,
        PersonnelError::TooLarge { .. } => Code::ResourceExhausted,
        PersonnelError::Aborted(_) => Code::Cancelled,
        PersonnelError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        PersonnelError::Full(_) => Code::ResourceExhausted,
        PersonnelError::Corrupt(_) => Code::DataLoss,
        PersonnelError::Unavailable {
            retriable: true, ..
        } => Code::Unavailable,
        PersonnelError::Unavailable { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn user_id(value: u64) -> Result<u64, Status> {
    if value == 0 {
        Err(Status::invalid_argument("user_id must be 1 or more"))
    } else {
        Ok(value)
    }
}

fn image_ref(image: &ImageRef) -> pb::ImageRef {
    pb::ImageRef {
        sha256: image.sha256.clone(),
        content_type: image.content_type.clone(),
        size: image.size,
    }
}

fn user_details(user: UserDetails) -> pb::UserDetails {
    pb::UserDetails {
        user_id: user.user_id,
        name: user.name,
        email: user.email,
        country: user.country,
        currency: user.currency,
        monthly_budget_minor: user.monthly_budget_minor,
        cards: user
            .cards
            .into_iter()
            .map(|c| pb::MaskedCard {
                card_id: c.card_id,
                masked_number: c.masked_number,
            })
            .collect(),
        image: user.image.as_ref().map(image_ref),
    }
}

type ImageStream = Pin<Box<dyn Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl PersonnelRpc for PersonnelService {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::UserDetails>, Status> {
        let id = user_id(request.get_ref().user_id)?;
        check(&request, |p| p.personnel(id, false))?;
        let personnel = self.personnel()?;
        match personnel.user(id).await.map_err(status)? {
            Some(user) => Ok(Response::new(user_details(user))),
            None => Err(Status::not_found(format!("user {id} does not exist"))),
        }
    }

    async fn upload_image(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::UploadImageResponse>, Status> {
        // The scope is checked before anything is read; the user once the header says who.
        check(&request, |p| {
            p.require(crate::serve::auth::Scope::PersonnelWrite)
        })?;
        let caller = caller(&request);
        let personnel = self.personnel()?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadImageRequest {
                part: Some(Part::Header(header)),
            }) => header,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first UploadImage message must be a header (user_id, content_type); \
                     chunks follow it",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "empty UploadImage stream: send a header, then the image in chunks",
                ));
            }
        };
        let id = user_id(header.user_id)?;
        if let Some(caller) = &caller {
            caller.principal.personnel(id, true).map_err(auth_status)?;
        }
        // Refuse early, before a single chunk is read.
        images::check_declared(&header.content_type)
            .map_err(|e| status(PersonnelError::from(e)))?;
        personnel.require_user(id).await.map_err(status)?;

        let chunks = upload_chunks(stream, header.size, UPLOAD_IDLE_TIMEOUT);
        let image = personnel
            .upload(id, &header.content_type, chunks)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UploadImageResponse {
            image: Some(image_ref(&image)),
        }))
    }

    type GetImageStream = ImageStream;

    async fn get_image(
        &self,
        request: Request<pb::GetImageRequest>,
    ) -> Result<Response<Self::GetImageStream>, Status> {
        let id = user_id(request.get_ref().user_id)?;
        check(&request, |p| p.personnel(id, false))?;
        let personnel = self.personnel()?;
        let Some((image, bytes)) = personnel.image(id).await.map_err(status)? else {
            personnel.require_user(id).await.map_err(status)?;
            return Err(Status::not_found(format!(
                "user {id} has no image; upload one with UploadImage"
            )));
        };
        let bytes = Bytes::from(bytes);
        let mut messages = Vec::with_capacity(bytes.len() / CHUNK_BYTES + 1);
        let mut offset = 0;
        loop {
            let end = (offset + CHUNK_BYTES).min(bytes.len());
            messages.push(Ok(pb::ImageChunk {
                image: (offset == 0).then(|| image_ref(&image)),
                data: bytes.slice(offset..end).to_vec(),
            }));
            offset = end;
            if offset >= bytes.len() {
                break;
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn delete_image(
        &self,
        request: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let id = user_id(request.get_ref().user_id)?;
        check(&request, |p| p.personnel(id, true))?;
        let personnel = self.personnel()?;
        let removed = personnel.delete_image(id).await.map_err(status)?;
        Ok(Response::new(pb::DeleteImageResponse {
            removed: removed.as_ref().map(image_ref),
        }))
    }
}

/// Reports `spendflow.v1.Personnel` as serving if it is configured, not serving otherwise.
pub async fn report_health(reporter: &tonic_health::server::HealthReporter, configured: bool) {
    if configured {
        reporter
            .set_serving::<PersonnelServer<PersonnelService>>()
            .await;
    } else {
        reporter
            .set_not_serving::<PersonnelServer<PersonnelService>>()
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_deadlines_and_a_full_store_have_their_own_codes() {
        let late = status(PersonnelError::DeadlineExceeded(
            "the upload did not finish within 120 s".into(),
        ));
        assert_eq!(late.code(), Code::DeadlineExceeded);
        assert!(late.message().contains("120 s"), "{late:?}");
        let full = status(PersonnelError::from(ImageError::Full {
            store: "memory".into(),
            limit: "at most 1000 images".into(),
        }));
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.message().contains("at most 1000 images"), "{full:?}");
    }
}
