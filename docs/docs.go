// Package docs carries the documents the server serves itself: the
// OpenAPI description of its HTTP API.
package docs

import _ "embed"

// OpenAPI is docs/openapi.yaml, the OpenAPI 3.1 description of the HTTP
// API (served as JSON at GET /v1/openapi.json).
//
//go:embed openapi.yaml
var OpenAPI []byte
