// Command eventcaddy is the Caddy of cmd/caddy (the standard modules and
// the token broker) plus the tests' events handler
// (integration/eventlog), which the product's Caddy does not have. The
// integration tests build it to subscribe to the broker's events.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/tokenbroker/caddy-token-broker/integration/eventlog"
	_ "github.com/tokenbroker/caddy-token-broker/module"
)

func main() {
	caddycmd.Main()
}
