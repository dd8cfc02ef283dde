package broker

import (
	"context"
	"time"
)

// nopObserver is an Observer told nothing it keeps: the tests' observers
// embed it and implement what they record.
type nopObserver struct{}

func (nopObserver) Lookup(*Binding, Result)                                              {}
func (nopObserver) Fetched(context.Context, *Binding, Token, time.Duration, bool, error) {}
func (nopObserver) FetchDone(context.Context, *Binding, Fetch)                           {}
func (nopObserver) BreakerChanged(string, BreakerState)                                  {}
func (nopObserver) BackingOff(*Binding, bool)                                            {}
func (nopObserver) SourceBackingOff(string, bool)                                        {}
func (nopObserver) RefreshPlanned(*Binding, time.Time)                                   {}
func (nopObserver) RefreshBehind(*Binding, time.Time)                                    {}
