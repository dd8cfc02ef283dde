package oauth

// The broker's sources run against a real authorization server in these
// tests: zitadel's OpenID provider with the strict defaults of a certified
// one (integration/optest).

import (
	"log/slog"
	"os"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// TestMain silences the logs zitadel writes through slog's default logger
// when it registers its routes.
func TestMain(m *testing.M) {
	slog.SetDefault(optest.Quiet())
	os.Exit(m.Run())
}
