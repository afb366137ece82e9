// Package apidoc serves the OpenAPI description of the HTTP API
// (docs/openapi.yaml) at GET /v1/openapi.json.
package apidoc

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/chatd/chatd/docs"
)

// Load parses and validates docs/openapi.yaml.
func Load() (*openapi3.T, error) {
	doc, err := openapi3.NewLoader().LoadFromData(docs.OpenAPI)
	if err != nil {
		return nil, fmt.Errorf("openapi.yaml: %w", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("openapi.yaml: %w", err)
	}
	return doc, nil
}

// Handler returns the handler of GET /v1/openapi.json: the document as
// JSON, made once.
func Handler() (http.Handler, error) {
	doc, err := Load()
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("openapi.json: %w", err)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		// The client's connection is all that can fail now.
		_, _ = w.Write(body)
	}), nil
}
