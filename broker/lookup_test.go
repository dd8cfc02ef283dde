package broker

import "context"

// Token returns a valid token for the binding (Get's entry's token), for
// the tests of this package.
func (br *Broker) Token(ctx context.Context, b *Binding) (Token, error) {
	e, _, err := br.Get(ctx, b)
	if err != nil {
		return Token{}, err
	}
	return e.Token(), nil
}
