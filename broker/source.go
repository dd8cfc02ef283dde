package broker

import (
	"context"
	"crypto/sha256"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// Source obtains access tokens from one provider's token API.
//
// Token is called at most once at a time per cache key, concurrently for
// different keys; it must honour ctx's cancellation. A returned error
// should be an *APIError when the provider answered, and never contains a
// credential or a token.
type Source interface {
	// Token obtains a token for req from the provider.
	Token(ctx context.Context, req Request) (Token, error)
}

// PerMerchant is implemented by sources whose tokens belong to one merchant
// (a refresh-token source): the merchant is then part of the cache key.
type PerMerchant interface {
	// PerMerchant reports whether the source's tokens are per merchant.
	PerMerchant() bool
}

// DPoPBound is implemented by sources whose tokens can be bound to a DPoP
// key (RFC 9449).
type DPoPBound interface {
	// DPoPKey returns the key the tokens are bound to, nil when they are
	// bearer tokens.
	DPoPKey() *dpop.Key
}

// Revoker is implemented by sources whose provider can revoke a token it
// issued (Nuapay's revoke endpoints, RFC 7009).
type Revoker interface {
	// RevokeToken revokes tok, which was issued for req.
	RevokeToken(ctx context.Context, req Request, tok Token) error
}

// Request describes the token wanted.
type Request struct {
	// Merchant is the merchant the token is for, for errors and logs.
	Merchant string
	// Organisation is the provider's identifier of the merchant's
	// organisation (Nuapay's encodedOrganisationId); empty where the
	// credentials alone select the account.
	Organisation string
	// Scopes are the scopes to ask for, normalised (NormaliseScopes).
	Scopes []string
	// Audience is the audience or resource the token is for, if any.
	Audience string
	// Lifetime is the lifetime to ask for, where the provider lets the
	// client choose; zero for the source's default.
	Lifetime time.Duration
}

// Profile is what the bindings of one source, scope set, audience and
// lifetime share, so that a binding holds only its merchant, organisation
// and cache key. Immutable once made (NewProfile).
type Profile struct {
	// SourceID names the source and the version of its configuration
	// ("nuapay-sandbox#3f2a9c01"): it is part of the cache key, so it
	// must change whenever the source's configuration does.
	SourceID string
	// Source is where tokens come from.
	Source Source
	// Scopes are the scopes to ask for, normalised. Shared: never modify
	// them.
	Scopes []string
	// Audience is the audience or resource the token is for, if any.
	Audience string
	// Lifetime is the lifetime to ask for; zero for the source's default.
	Lifetime time.Duration
	// DPoP is the key the source's tokens are bound to (DPoPBound); nil
	// for bearer tokens. A request carrying such a token must carry a
	// fresh proof signed with it. Part of the cache key.
	DPoP *dpop.Key
	// Budget is the provider's token API budget, shared by all its
	// profiles, taken before every call to Source; nil for none. Set it
	// right after NewProfile; it is not part of the cache key.
	Budget *budget.Budget

	perMerchant bool   // Source implements PerMerchant and says true
	keyTag      string // the cache keys' first keyTagLen bytes (see keyFor)
}

// keyTagLen is the length of a profile's key tag: the first 128 bits of
// the SHA-256 of its length-prefixed source ID, scopes, audience,
// lifetime, PerMerchant and DPoP thumbprint.
const keyTagLen = 16

// NewProfile returns the profile of a source for a scope set (normalised:
// see NormaliseScopes), audience and lifetime.
func NewProfile(sourceID string, src Source, scopes []string, audience string, lifetime time.Duration) *Profile {
	p := &Profile{SourceID: sourceID, Source: src, Scopes: NormaliseScopes(scopes), Audience: audience, Lifetime: lifetime}
	if pm, ok := src.(PerMerchant); ok && pm.PerMerchant() {
		p.perMerchant = true
	}
	parts := []string{sourceID, strings.Join(p.Scopes, " "), audience, lifetime.String(), strconv.FormatBool(p.perMerchant)}
	if db, ok := src.(DPoPBound); ok {
		if p.DPoP = db.DPoPKey(); p.DPoP != nil {
			parts = append(parts, "dpop", p.DPoP.Thumbprint())
		}
	}
	h := sha256.New()
	for _, part := range parts {
		h.Write(strconv.AppendInt(nil, int64(len(part)), 10))
		h.Write([]byte{':'})
		h.Write([]byte(part))
	}
	p.keyTag = string(h.Sum(nil)[:keyTagLen])
	return p
}

// keyFor returns the cache key of a merchant's binding under p: the
// profile's tag then the organisation or, for a PerMerchant source, the
// organisation's length, ':', the organisation and the merchant.
func (p *Profile) keyFor(merchant, organisation string) string {
	if p.perMerchant {
		return p.keyTag + strconv.Itoa(len(organisation)) + ":" + organisation + merchant
	}
	return p.keyTag + organisation
}

// Binding ties a merchant to its Profile and to the cache key under which
// its token is kept. Build bindings once, at configuration load, and reuse
// them: the hot path then computes nothing.
type Binding struct {
	// Profile is shared with the other bindings made from it: never nil
	// in a binding in use, and never modified through a binding.
	*Profile
	current atomic.Pointer[Entry] // the entry this binding was last served
	// Observer, when set, is told about this binding's lookups and
	// fetches.
	Observer Observer
	// Merchant is the merchant the token is for, for errors and logs.
	Merchant string
	// Organisation is the provider's identifier of the merchant's
	// organisation (see Request.Organisation).
	Organisation string

	key string
}

// Request returns what is asked for, built on each call (the cold path).
func (b *Binding) Request() Request {
	return Request{Merchant: b.Merchant, Organisation: b.Organisation, Scopes: b.Scopes, Audience: b.Audience, Lifetime: b.Lifetime}
}

// NewBindingFor returns the binding of a merchant under a shared profile,
// its cache key computed.
func NewBindingFor(p *Profile, merchant, organisation string) *Binding {
	b := new(Binding)
	b.InitFor(p, merchant, organisation)
	return b
}

// InitFor fills b, a zero Binding not in use yet, as NewBindingFor would.
func (b *Binding) InitFor(p *Profile, merchant, organisation string) {
	b.Profile, b.Merchant, b.Organisation, b.key = p, merchant, organisation, p.keyFor(merchant, organisation)
}

// Key is the cache key of the binding, an opaque binary string: equal for
// two bindings exactly when their profiles' settings (keyTagLen) and their
// organisations are, and for a PerMerchant source their merchants. Never
// log it.
func (b *Binding) Key() string { return b.key }

// NormaliseScopes returns the scopes sorted, trimmed and without duplicates
// or empty strings: the input itself when already normalised, so callers
// must not modify the result.
func NormaliseScopes(scopes []string) []string {
	if normalised(scopes) {
		return scopes
	}
	out := make([]string, 0, len(scopes))
	for _, s := range scopes {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// normalised reports whether scopes are sorted, trimmed and without
// duplicates or empty strings.
func normalised(scopes []string) bool {
	for i, s := range scopes {
		if s == "" || strings.TrimSpace(s) != s || (i > 0 && scopes[i-1] >= s) {
			return false
		}
	}
	return true
}
