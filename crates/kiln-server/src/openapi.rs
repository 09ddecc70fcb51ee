//! What the OpenAPI document says about every route at once: how TCP clients authenticate, and the
//! errors any route may answer before its handler runs (401 on TCP, 413 for large bodies, 429).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// Name of the security scheme in the document.
const BEARER: &str = "bearer";

/// Errors the middleware may answer for any route.
const COMMON_ERRORS: [(&str, &str); 3] = [
    (
        "401",
        "missing or wrong bearer token (TCP only; the unix socket needs none): `unauthorized`",
    ),
    (
        "413",
        "request body over the daemon's limit: `payload_too_large`",
    ),
    (
        "429",
        "too many requests from this client (`rate_limited`) or not enough capacity (`capacity_exceeded`); both carry Retry-After (seconds)",
    ),
];

pub(crate) struct AuthAndCommonErrors;

impl utoipa::Modify for AuthAndCommonErrors {
    fn modify(&self, api: &mut OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The API token (`kiln token rotate`), required on TCP (`kiln serve --listen`)",
                    ))
                    .build(),
            ),
        );
        // Either no credentials (the unix socket) or the bearer token (TCP).
        api.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
        ]);
        for (path, item) in api.paths.paths.iter_mut() {
            // Mutating routes run as operations (routes/operations.rs): `Prefer: respond-async` gets 202.
            if !path.contains("/exec")
                && !path.contains("/files")
                && !path.contains("/processes")
                && !path.ends_with("/import")
            {
                for op in [&mut item.post, &mut item.delete].into_iter().flatten() {
                    op.responses
                        .responses
                        .entry("202".to_string())
                        .or_insert_with(accepted_response);
                }
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                for (status, description) in COMMON_ERRORS {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error_response(description));
                }
            }
        }
    }
}

fn accepted_response() -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(
                "with `Prefer: respond-async`: the operation, still running (`Location: /v1/operations/{id}`); \
                 every answer of this route carries `Kiln-Operation: op-...`",
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Operation")))
                    .build(),
            )
            .build(),
    )
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}
