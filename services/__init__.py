"""Conveyor's services (one package per service) and the ``conveyor`` CLI."""
