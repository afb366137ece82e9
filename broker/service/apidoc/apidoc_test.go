package apidoc_test

import (
	"testing"

	"github.com/chatd/chatd/broker/service/apidoc"
)

// TestDocumentIsValid loads docs/openapi.yaml and validates it as
// OpenAPI 3.1.
func TestDocumentIsValid(t *testing.T) {
	doc, err := apidoc.Load()
	if err != nil {
		t.Fatal(err)
	}
	if doc.OpenAPI != "3.1.0" || doc.Paths.Len() == 0 {
		t.Fatalf("openapi %q with %d paths", doc.OpenAPI, doc.Paths.Len())
	}
}
