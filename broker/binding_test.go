package broker

// NewBinding returns the binding of req.Merchant under a profile of its
// own, as brokertest.NewBinding does for the tests of other packages.
func NewBinding(sourceID string, src Source, req Request) *Binding {
	return NewBindingFor(NewProfile(sourceID, src, req.Scopes, req.Audience, req.Lifetime), req.Merchant, req.Organisation)
}
