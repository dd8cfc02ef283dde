// Package caddytokenbroker plugs the token broker into Caddy. Importing it
// registers the token_broker app, handler and Caddyfile directive, so that
//
//	xcaddy build --with github.com/tokenbroker/caddy-token-broker
//
// builds a Caddy with the broker. The code lives in module/ (the Caddy
// adapter), broker/ and config/.
package caddytokenbroker

import (
	// The Caddy modules of the token broker.
	_ "github.com/tokenbroker/caddy-token-broker/module"
)
