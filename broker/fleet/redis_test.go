package fleet

import (
	"testing"

	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// startRedis starts a real redis-server for the test (see redistest).
func startRedis(t *testing.T) *redistest.Server { return redistest.Start(t) }
