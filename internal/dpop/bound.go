package dpop

import "context"

// Bound is a DPoP-bound access token with the key it is bound to: what a
// request to a resource server needs to carry "Authorization: DPoP
// <token>" and its proof.
type Bound struct {
	// Key signs the proofs.
	Key *Key
	// Token is the access token. Never log it.
	Token string
}

type boundKey struct{}

// WithBound returns ctx carrying b.
func WithBound(ctx context.Context, b Bound) context.Context {
	return context.WithValue(ctx, boundKey{}, b)
}

// BoundFrom returns the Bound that ctx carries, if any.
func BoundFrom(ctx context.Context) (Bound, bool) {
	b, ok := ctx.Value(boundKey{}).(Bound)
	return b, ok && b.Key != nil
}
