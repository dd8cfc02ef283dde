package dpop

import "net/url"

// Origin returns the origin of u as the nonces are keyed by it
// (appendOrigin), for the tests of package dpop_test.
func Origin(u *url.URL) string { return string(appendOrigin(nil, u)) }
