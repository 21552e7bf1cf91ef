"""Conveyor's default policy set (Cedar), shipped as package data so that an
installed policy service finds it without a source checkout."""
