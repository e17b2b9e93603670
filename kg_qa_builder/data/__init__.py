"""Packaged data of kg_qa_builder: the KG schema and curated fact YAML (a package so wheels ship it)."""
