//! The captured nginx uwsgi packets (tests/fixtures/*.bin; tests/fixtures/README.md says how they were recorded).

pub const GET_QUERY: &[u8] = include_bytes!("../../fixtures/get_query.bin");
pub const REPEATED_HEADERS: &[u8] = include_bytes!("../../fixtures/repeated_headers.bin");
pub const POST_FORM: &[u8] = include_bytes!("../../fixtures/post_form.bin");
pub const CHUNKED_UPLOAD: &[u8] = include_bytes!("../../fixtures/chunked_upload.bin");
pub const LARGE_COOKIE: &[u8] = include_bytes!("../../fixtures/large_cookie.bin");
pub const NON_ASCII_PATH: &[u8] = include_bytes!("../../fixtures/non_ascii_path.bin");

/// Every capture with its name, for the tests that go through all of them.
pub const FIXTURES: [(&str, &[u8]); 6] = [
    ("get_query", GET_QUERY),
    ("repeated_headers", REPEATED_HEADERS),
    ("post_form", POST_FORM),
    ("chunked_upload", CHUNKED_UPLOAD),
    ("large_cookie", LARGE_COOKIE),
    ("non_ascii_path", NON_ASCII_PATH),
];
