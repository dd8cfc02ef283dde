// Command caddy is Caddy with its standard modules and the token broker.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/tokenbroker/caddy-token-broker/module"
)

func main() {
	caddycmd.Main()
}
